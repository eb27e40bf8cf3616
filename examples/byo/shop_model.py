"""A product tagger written the way a team writes its own model: a plain
``nn.Module`` with no mmpipe in it.

A BERT-style text encoder (``transformers.BertModel`` from a small config)
and a ResNet-style image encoder (residual conv blocks) each give one
vector; the two are concatenated and a linear head per task reads them.
``forward`` takes keyword arguments named as in ``signature.yaml`` and
returns a dict of logits by output name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ImageEncoder(nn.Module):
    """ResNet-style: a stem, residual stages, global average pooling."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c = [], widths[0]
        for w in widths:
            stages.append(ResidualBlock(c, w, 2 if w != c else 1))
            c = w
        self.stages = nn.Sequential(*stages)
        self.out_dim = c

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class ShopTagger(nn.Module):
    """Text + image -> category (multiclass) and attributes (multilabel) logits."""

    def __init__(self, vocab_size: int, n_categories: int, n_attributes: int, hidden: int = 64,
                 layers: int = 2, heads: int = 2, max_length: int = 64) -> None:
        super().__init__()
        self.text = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=hidden * 2,
                                         max_position_embeddings=max_length), add_pooling_layer=False)
        self.image = ImageEncoder()
        joined = hidden + self.image.out_dim
        self.category = nn.Linear(joined, n_categories)
        self.attributes = nn.Linear(joined, n_attributes)

    def forward(self, token_ids: Tensor, token_mask: Tensor, image: Tensor) -> dict[str, Tensor]:
        hidden = self.text(input_ids=token_ids, attention_mask=token_mask).last_hidden_state
        mask = token_mask.unsqueeze(-1).to(hidden.dtype)
        text_vec = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # mean over real tokens
        joined = torch.cat([text_vec, self.image(image)], dim=-1)
        return {"category": self.category(joined), "attributes": self.attributes(joined)}
