"""What a fault case reports, and the accounting by record id behind it.

Every case of the fault suite sends records with unique ids through a path
while something breaks (a process killed, a server restarted, a disk
filling up, an engine slowed down), then collects what came out: results,
and error entries (dead letters on the stream, error rows in the batch
output, reason-coded error results online).  :func:`account` reduces that
to one :class:`FaultOutcome`:

* ``received``: ids with at least one result;
* ``errors``: ids with no result but at least one error entry;
* ``losses``: ids sent that came out neither way (must be 0);
* ``duplicates``: deliveries beyond the first per id (allowed by
  at-least-once delivery, never by exactly-once or the batch job);
* ``unexpected``: ids that came out but were never sent (must be 0).

So ``received + errors + losses == sent`` always holds, and a case passes
only with ``losses == 0``.  Failed attempts a client retried (a request
refused while a replica restarted) are counted in ``retries``, apart from
losses: they are the cost of the fault, not lost records.

The outcomes of a pytest session are written to the JSON file named by
``MMPIPE_FAULTS_OUT`` (see ``bench/faults.py``) and printed as a table at
the end of the run.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FaultOutcome:
    """One fault case's numbers (see the module docstring)."""

    case: str
    path: str
    sent: int
    received: int
    errors: int
    duplicates: int
    losses: int
    notes: str = ""
    retries: int = 0
    """failed attempts that a client retried (not losses)"""
    mismatches: int = 0
    """results that differ from the reference Predictor's for the same record"""
    unexpected: int = 0
    """ids that came out but were never sent"""
    seconds: float = 0.0
    """wall time of the case, fixtures shared with other cases excluded"""
    details: dict[str, Any] = field(default_factory=dict)
    """case-specific measurements (peak in-flight records, RSS, exit codes, ...)"""
    lost_ids: list[str] = field(default_factory=list)
    """up to 20 of the lost ids, to start a diagnosis from"""

    @property
    def ok(self) -> bool:
        return self.losses == 0 and self.unexpected == 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def row(self) -> str:
        return (f"{self.case:<44} {self.path:<7} {self.sent:>5} {self.received:>7} {self.errors:>6} "
                f"{self.duplicates:>5} {self.losses:>6} {self.retries:>7}  {self.notes}")


HEADER = (f"{'case':<44} {'path':<7} {'sent':>5} {'results':>7} {'errors':>6} {'dupes':>5} {'losses':>6} "
          f"{'retries':>7}  notes")


def account(case: str, path: str, sent: Iterable[str], results: Iterable[str], errors: Iterable[str] = (), *,
            notes: str = "", retries: int = 0, mismatches: int = 0, details: dict[str, Any] | None = None,
            ) -> FaultOutcome:
    """The outcome of a case from ids: ``sent`` (unique), and the id of
    every result and every error entry that came out, repeats included."""
    sent_list = list(sent)
    sent_set = set(sent_list)
    if len(sent_set) != len(sent_list):
        raise ValueError("the ids sent must be unique: accounting is by record id")
    res, err = Counter(results), Counter(errors)
    delivered = res + err
    got_result = sent_set & set(res)
    got_error = (sent_set & set(err)) - got_result
    lost = sent_set - got_result - got_error
    unexpected = set(delivered) - sent_set
    return FaultOutcome(
        case=case, path=path, sent=len(sent_set), received=len(got_result), errors=len(got_error),
        duplicates=sum(delivered.values()) - len(delivered), losses=len(lost), notes=notes, retries=retries,
        mismatches=mismatches, unexpected=len(unexpected), details=dict(details or {}),
        lost_ids=sorted(lost)[:20],
    )


def table(outcomes: Iterable[FaultOutcome]) -> str:
    return "\n".join([HEADER, *(o.row() for o in outcomes)])
