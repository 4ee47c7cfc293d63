"""Snapshots of pseudo-labelled cases: one PNG montage per ranked case and an ``index.html`` in ranking order.

For an output folder of :func:`nnunet_mmssl.semisup.pseudolabel.pseudolabel` (``ranking.csv``, ``labels/``,
``uncertainty/``, ``pseudolabel.json`` naming the input images), :func:`write_snapshots` writes::

    OUT/snapshots/RANK_CASE.png   a few slices (rows): the slice with the most predicted foreground, the slice with
                                  the most uncertainty (summed entropy) and the slice in between; columns: the first
                                  channel with the label's contours, and with the entropy overlaid; title: rank, case
                                  id and score
    OUT/snapshots/index.html      the cases in ranking order (rank 1 = annotate first) with their montage

Each PNG is written under a temporary name, read back (its pixel size checked) and renamed; the whole folder is built
as a hidden sibling and renamed when complete, so a killed run never leaves a half-written ``snapshots``.
"""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
import struct

import numpy as np

SNAPSHOTS_FOLDER = "snapshots"
INDEX = "index.html"
#: pixels per inch of the PNGs (a 3 x 2 montage is about 800 x 1100 pixels)
DPI = 100


def png_size(path: str) -> tuple[int, int]:
    """(width, height) of a PNG from its header.

    Raises:
        ValueError: not a PNG file.
    """
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def choose_slices(label: np.ndarray, entropy: np.ndarray, count: int = 3) -> list[int]:
    """Indices along axis 0 to show: the slice with the most predicted foreground, the slice with the largest summed
    entropy (the most uncertain region), and slices between them (or around them), at most ``count``, sorted.

    Args:
        label: (Z, Y, X) label map.
        entropy: (Z, Y, X) entropy map.
        count: slices wanted (fewer if the image has fewer).
    """
    depth = label.shape[0]
    foreground = (label > 0).reshape(depth, -1).sum(1)
    uncertainty = entropy.reshape(depth, -1).sum(1)
    chosen = [int(np.argmax(foreground)) if foreground.any() else depth // 2, int(np.argmax(uncertainty))]
    chosen.append((chosen[0] + chosen[1]) // 2)
    for offset in range(1, depth):
        chosen += [chosen[0] + offset, chosen[0] - offset]
    out: list[int] = []
    for z in chosen:
        if 0 <= z < depth and z not in out:
            out.append(z)
        if len(out) == min(count, depth):
            break
    return sorted(out)


def draw_montage(image: np.ndarray, label: np.ndarray, entropy: np.ndarray, title: str, path: str,
                 max_entropy: float, count: int = 3) -> tuple[int, int]:
    """Draw the montage of one case into ``path`` (PNG); return its (width, height) in pixels.

    Args:
        image, label, entropy: (Z, Y, X) arrays on the same grid (a 2D case has Z = 1).
        title: the figure's title (case id, rank, score).
        path: the PNG file.
        max_entropy: the colour scale's top (log C, or log 2 for regions).
        count: slices shown.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, the PNG is drawn by Agg

    slices = choose_slices(label, entropy, count)
    figure = Figure(figsize=(8, 0.6 + 3.4 * len(slices)), dpi=DPI)
    axes = figure.subplots(len(slices), 2, squeeze=False)
    labels = [v for v in np.unique(label) if v > 0]
    colours = ["#ff3030", "#30ff30", "#3080ff", "#ffd030", "#ff30ff", "#30ffff"]
    for row, z in enumerate(slices):
        finite = image[z][np.isfinite(image[z])]
        low, high = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
        for column in (0, 1):
            ax = axes[row, column]
            ax.imshow(image[z], cmap="gray", vmin=low, vmax=high if high > low else low + 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        for k, value in enumerate(labels):
            mask = (label[z] == value).astype(float)
            if mask.any() and not mask.all():
                for column in (0, 1):
                    axes[row, column].contour(mask, levels=[0.5], colors=colours[k % len(colours)],
                                              linewidths=1.0 if column == 0 else 0.6)
        overlay = axes[row, 1].imshow(np.ma.masked_less_equal(entropy[z], 0), cmap="inferno", alpha=0.6, vmin=0,
                                      vmax=max_entropy, interpolation="nearest")
        axes[row, 0].set_ylabel(f"slice {z}")
        if row == 0:
            axes[row, 0].set_title("image, label contours")
            axes[row, 1].set_title("entropy (nats), label contours")
            figure.colorbar(overlay, ax=axes[row, 1], fraction=0.046, pad=0.04)
    figure.suptitle(title)
    figure.subplots_adjust(left=0.06, right=0.94, bottom=0.02, top=1 - 0.75 / figure.get_figheight(), wspace=0.15,
                           hspace=0.08)  # fixed margins: tight_layout would draw the figure once more
    figure.savefig(path, format="png", dpi=DPI)
    return png_size(path)


def _index_html(rows: list[dict], files: dict[str, str], sizes: dict[str, tuple[int, int]], title: str) -> str:
    lines = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif} td{vertical-align:top;padding:6px} img{max-width:100%}</style>",
             "</head><body>", f"<h1>{html.escape(title)}</h1>",
             ("<p>Cases in ranking order: annotate rank 1 first. Left: the label's contours on the first channel; "
              "right: the entropy of the prediction (bright = uncertain).</p>"), "<table>",
             "<tr><th>rank</th><th>case</th><th>score</th><th>snapshot</th></tr>"]
    for row in rows:
        case = row["case"]
        name = html.escape(files[case], quote=True)
        width, height = sizes[case]
        lines.append(f"<tr id=\"{html.escape(case, quote=True)}\"><td>{int(row['rank'])}</td>"
                     f"<td>{html.escape(case)}</td><td>{html.escape(str(row['score']))}</td>"
                     f"<td><a href=\"{name}\"><img src=\"{name}\" width=\"{width // 2}\" height=\"{height // 2}\" "
                     f"alt=\"{html.escape(case, quote=True)}\"></a></td></tr>")
    lines += ["</table>", "</body></html>"]
    return "\n".join(lines) + "\n"


def _softmax_top(model_folder: str | None) -> float | None:
    """log C for the model's C classes (its dataset.json), or None when it cannot be read (the case's maximum is
    used then)."""
    from nnunet_mmssl.semisup.uncertainty import max_entropy

    try:
        with open(os.path.join(model_folder, "dataset.json")) as handle:
            labels = json.load(handle)["labels"]
        return max_entropy(len([k for k in labels if k != "ignore"]), False)
    except (OSError, TypeError, KeyError, ValueError):
        return None


def write_snapshots(output_folder: str, input_folder: str | None = None, count: int = 3) -> list[dict]:
    """Write ``OUT/snapshots`` (a PNG per ranked case and ``index.html``) for a pseudo-label output folder.

    Args:
        output_folder: the folder written by :func:`~nnunet_mmssl.semisup.pseudolabel.pseudolabel`.
        input_folder: the images (default: ``input_folder`` of its ``pseudolabel.json``).
        count: slices per montage.

    Returns:
        One dict per case in ranking order: ``rank``, ``case``, ``score``, ``png`` (path), ``size`` (w, h).

    Raises:
        ValueError: a missing ranking, label, entropy map or image, naming the file.
    """
    import SimpleITK as sitk

    from nnunet_mmssl.io_checks import publish_folder, write_text, write_verified
    from nnunet_mmssl.semisup.uncertainty import max_entropy

    ranking = os.path.join(output_folder, "ranking.csv")
    settings_file = os.path.join(output_folder, "pseudolabel.json")
    for path in (ranking, settings_file):
        if not os.path.isfile(path):
            raise ValueError(f"{path}, not found: {output_folder} is not an output of nnUNetv2_mmssl_pseudolabel. "
                             f"Run it first")
    with open(ranking, newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: int(r["rank"]))
    with open(settings_file) as handle:
        settings = json.load(handle)
    input_folder = input_folder or settings["input_folder"]
    if not rows:
        raise ValueError(f"{ranking}, lists no case. Run nnUNetv2_mmssl_pseudolabel again")
    ending = rows[0]["label"][len("labels/" + rows[0]["case"]):]
    top = max_entropy(2, True) if settings.get("sigmoid_regions") else _softmax_top(settings.get("model_folder"))

    final = os.path.join(output_folder, SNAPSHOTS_FOLDER)
    tmp = os.path.join(output_folder, f".{SNAPSHOTS_FOLDER}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    written: list[dict] = []
    try:
        files, sizes = {}, {}
        for row in rows:
            case = row["case"]
            first_channel = os.path.join(input_folder, f"{case}_0000{ending}")
            if not os.path.isfile(first_channel):
                raise ValueError(f"{first_channel}, not found (case {case} of ranking.csv). Give the folder of the "
                                 f"unlabelled images")
            label_file = os.path.join(output_folder, row["label"])
            entropy_file = os.path.join(output_folder, row["entropy_map"])
            for path in (label_file, entropy_file):
                if not os.path.isfile(path):
                    raise ValueError(f"{path}, not found. Run nnUNetv2_mmssl_pseudolabel again")
            image = sitk.GetArrayFromImage(sitk.ReadImage(first_channel)).astype(np.float32)
            label = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
            entropy = sitk.GetArrayFromImage(sitk.ReadImage(entropy_file)).astype(np.float32)
            if image.ndim == 2:
                image, label, entropy = image[None], label[None], entropy[None]
            if not image.shape == label.shape == entropy.shape:
                raise ValueError(f"{entropy_file}, its grid {entropy.shape} differs from the label {label.shape} or "
                                 f"the image {image.shape}. Run nnUNetv2_mmssl_pseudolabel again")
            rank = int(row["rank"])
            name = f"{rank:03d}_{case}.png"
            scale = top if top is not None else float(max(entropy.max(), 1e-6))
            title = f"rank {rank}: {case}   score {float(row['score']):.4g}"
            holder: dict = {}

            def draw(path: str, image=image, label=label, entropy=entropy, title=title, scale=scale,
                     holder=holder) -> None:
                holder["size"] = draw_montage(image, label, entropy, title, path, scale, count)

            def verify(path: str, holder=holder) -> None:
                if png_size(path) != holder["size"] or os.path.getsize(path) < 100:
                    raise ValueError("the PNG read back is not the one drawn")

            write_verified(os.path.join(tmp, name), draw, verify, shown=os.path.join(final, name))
            files[case], sizes[case] = name, holder["size"]
            written.append({"rank": rank, "case": case, "score": row["score"], "png": os.path.join(final, name),
                            "size": holder["size"]})
        write_text(_index_html(rows, files, sizes, f"Pseudo-labels: {len(rows)} case(s) in ranking order"),
                   os.path.join(tmp, INDEX), shown=os.path.join(final, INDEX))
        publish_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
