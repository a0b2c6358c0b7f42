"""``diffca-med swap`` and ``diffca-med interpolate``: salient-factor edits between two slices.

A slice is named ``SUBJECT:SLICE`` (the store's axial index) or just ``SUBJECT``, which
picks that subject's slice with the most labelled tumour pixels (or, without tumour,
its middle non-excluded slice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from diffca_med.cli.common import DEVICE_HELP, user_errors
from diffca_med.errors import ConfigError, InputError

_DATA_HELP = "A slice store from `diffca-med prepare` (or a raw BraTS/MSD/BIDS folder, prepared next to OUT)."
_SPEC_HELP = "SUBJECT:SLICE (axial index in the store) or SUBJECT (its slice with the most tumour)."


def resolve_slice(store, spec: str) -> tuple[int, str]:
    """Store row and a readable name for ``SUBJECT[:SLICE]``."""
    subject, sep, idx = spec.rpartition(":")
    if not sep or not idx.isdigit():
        subject, idx = spec, None
    index = store.index
    rows = np.flatnonzero((index["subject"].astype(str) == subject).to_numpy())
    if rows.size == 0:
        raise InputError(f"{store.path}: unknown subject {subject!r} (in {spec!r})")
    if idx is not None:
        hit = rows[index["slice"].to_numpy()[rows] == int(idx)]
        if hit.size == 0:
            lo, hi = index["slice"].to_numpy()[rows].min(), index["slice"].to_numpy()[rows].max()
            raise InputError(f"{store.path}: subject {subject} has no stored slice {idx} (stored: {lo}..{hi})")
        row = int(hit[0])
    else:
        tumour = index["tumour_pixels"].to_numpy()[rows]
        if tumour.max() > 0:
            row = int(rows[np.argmax(tumour)])
        else:
            usable = rows[index["label"].to_numpy()[rows] != "excluded"]
            usable = usable if usable.size else rows
            row = int(usable[len(usable) // 2])
    return row, f"{subject}:{int(index['slice'].iloc[row])}"


def _setup(model_path: Path, data: Path, out: Path, device: str):
    from diffca_med.analysis.counterfactuals import open_model_and_data

    if out.suffix.lower() != ".png":
        raise ConfigError(f"{out}: OUT must be a .png file")
    return open_model_and_data(model_path, data, out.parent / f"{out.stem}-store", device=device)


def _image(store, row: int, channels: list[int]):
    import torch

    return torch.as_tensor(np.asarray(store.images[row : row + 1][:, channels], np.float32))


def register(app: typer.Typer) -> None:
    @app.command("swap")
    @user_errors
    def swap_cmd(
        model: Path = typer.Argument(..., help="Trained model folder (from `diffca-med train`)."),
        data: Path = typer.Argument(..., help=_DATA_HELP),
        a: str = typer.Argument(..., help="First slice: " + _SPEC_HELP),
        b: str = typer.Argument(..., help="Second slice: " + _SPEC_HELP),
        out: Path = typer.Argument(..., help="Output PNG strip: A | B | common(A)+salient(B) | common(B)+salient(A) | pseudo-healthy A and B; rows = modalities."),
        noise: str = typer.Option("fresh", "--noise", help="Starting noise: 'fresh' or 'inverted' (DDIM inversion of the image whose common part is kept)."),
        inversion_depth: float = typer.Option(1.0, "--inversion-depth", help="Fraction of the trajectory inverted/re-generated, in (0, 1]."),
        steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps. Default: the model's sample_steps."),
        seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same images)."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    ) -> None:
        """Swap the salient (tumour) factor between two slices: each keeps its own common part (anatomy, contrast) and takes the other's salient part."""
        import torch

        from diffca_med.analysis.counterfactuals import save_strip

        net, store, channels = _setup(model, data, out, device)
        (ra, na), (rb, nb) = resolve_slice(store, a), resolve_slice(store, b)
        xa, xb = _image(store, ra, channels), _image(store, rb, channels)
        kw = {"noise": noise, "inversion_depth": inversion_depth, "steps": steps, "seed": seed}
        with torch.no_grad():
            ab = net.swap(xa, xb, **kw)[0].numpy()
            ba = net.swap(xb, xa, **kw)[0].numpy()
            ph = net.pseudo_healthy(torch.cat([xa, xb]), **kw).numpy()
        images = [xa[0].numpy(), xb[0].numpy(), ab, ba, ph[0], ph[1]]
        titles = [f"A {na}", f"B {nb}", "common A + salient B", "common B + salient A", "pseudo-healthy A", "pseudo-healthy B"]
        save_strip(out, [np.clip(i, 0, 1) for i in images], titles, net.config.modalities, f"swap · seed {seed} · {noise} noise")
        typer.echo(f"wrote {out}")

    @app.command("interpolate")
    @user_errors
    def interpolate_cmd(
        model: Path = typer.Argument(..., help="Trained model folder (from `diffca-med train`)."),
        data: Path = typer.Argument(..., help=_DATA_HELP),
        a: str = typer.Argument(..., help="Start slice (its common part is kept): " + _SPEC_HELP),
        b: str = typer.Argument(..., help="Slice whose salient part is interpolated towards: " + _SPEC_HELP),
        out: Path = typer.Argument(..., help="Output PNG strip: A, the interpolated images for each alpha, B; rows = modalities."),
        n: int = typer.Option(5, "--n", help="Number of alphas, evenly spaced from 0 (salient of A) to 1 (salient of B)."),
        noise: str = typer.Option("fresh", "--noise", help="Starting noise: 'fresh' or 'inverted' (DDIM inversion of A)."),
        inversion_depth: float = typer.Option(1.0, "--inversion-depth", help="Fraction of the trajectory inverted/re-generated, in (0, 1]."),
        steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps. Default: the model's sample_steps."),
        seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same images)."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    ) -> None:
        """Interpolate the salient factor from slice A's to slice B's while keeping A's common part: G(common(A) + (1 - alpha) salient(A) + alpha salient(B))."""
        import torch

        from diffca_med.analysis.counterfactuals import save_strip

        if n < 2:
            raise ConfigError(f"--n: need at least 2 alphas, got {n}")
        net, store, channels = _setup(model, data, out, device)
        (ra, na), (rb, nb) = resolve_slice(store, a), resolve_slice(store, b)
        xa, xb = _image(store, ra, channels), _image(store, rb, channels)
        alphas = np.linspace(0.0, 1.0, n).tolist()
        with torch.no_grad():
            seq = net.interpolate(xa, xb, alphas, noise=noise, inversion_depth=inversion_depth, steps=steps, seed=seed)
        images = [xa[0].numpy()] + [seq[i, 0].numpy() for i in range(n)] + [xb[0].numpy()]
        titles = [f"A {na}"] + [f"α = {al:.2f}" for al in alphas] + [f"B {nb}"]
        save_strip(out, [np.clip(i, 0, 1) for i in images], titles, net.config.modalities, f"salient interpolation · seed {seed}")
        typer.echo(f"wrote {out}")
