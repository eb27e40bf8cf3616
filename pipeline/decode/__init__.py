"""Per-modality decoders: record bytes -> model-ready arrays.

Every decoder either returns an array or raises ``RecordError`` with a stable
reason code; no other exception escapes for any input bytes, because one bad
record must never fail the batch it arrived in.

Importing the decoders routes Python warnings and the decoder libraries'
log records through JSON logging as their kind only
(``pipeline.log.capture_decoder_output``): their text quotes the bytes they
parsed, and a worker that decodes may never have configured logging.
"""

from pipeline.decode.audio import decode_audio, load_audio
from pipeline.decode.dicom import is_dicom
from pipeline.decode.image import decode_image, load_image, to_model_input
from pipeline.decode.video import contact_sheet, decode_video, load_keyframes
from pipeline.log import capture_decoder_output

capture_decoder_output()

__all__ = [
    "contact_sheet",
    "decode_audio",
    "decode_image",
    "decode_video",
    "is_dicom",
    "load_audio",
    "load_image",
    "load_keyframes",
    "to_model_input",
]
