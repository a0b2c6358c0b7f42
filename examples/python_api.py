"""Use a trained Diff-CA model from Python on slices of a prepared store.

    python examples/python_api.py work/run/model work/store out.png

Encodes a tumour slice and a healthy slice of the test split, writes a strip of
input | reconstruction | pseudo-healthy | swap (healthy anatomy + tumour salient)
for the first modality, and prints the salient embeddings.
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from diffca_med.data import SliceStore
from diffca_med.models import DiffCAModel


def main(model_dir: str, store_dir: str, out_png: str) -> None:
    model = DiffCAModel.from_pretrained(model_dir)
    store = SliceStore(store_dir)
    tumour_row = store.rows(split="test", labels=("tumour",))[0]
    healthy_row = store.rows(split="test", labels=("healthy",))[0]
    x = torch.from_numpy(store.images[[tumour_row, healthy_row]].copy())  # (2, C, H, W) in [0, 1]

    out = model.encode(x)
    print("salient embedding, tumour slice :", out.salient_embedding[0].numpy().round(2))
    print("salient embedding, healthy slice:", out.salient_embedding[1].numpy().round(2))

    options = dict(noise="inverted", inversion_depth=0.6, steps=20, seed=0)
    recon = model.reconstruct(x, **options)
    healthy = model.pseudo_healthy(x, **options)
    swapped = model.swap(x[1:], x[:1], **options)  # healthy slice's anatomy, tumour slice's salient part

    panels = [x[0], recon[0], healthy[0], swapped[0]]
    titles = ["tumour input", "reconstruction", "pseudo-healthy", "healthy + tumour salient"]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    for ax, image, title in zip(axes, panels, titles):
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)  # rows anterior->posterior, columns left->right
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    print("wrote", out_png)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
