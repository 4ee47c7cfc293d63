"""nnU-Net region datasets at conversion: ``labels`` with lists of label values and ``regions_class_order``.

nnU-Net trains region datasets (e.g. BraTS whole tumour WT / tumour core TC / enhancing tumour ET) with one sigmoid
output per region, a region being the union of some label values of the label files. ``dataset.json`` then declares::

    "labels": {"background": 0, "WT": [1, 2, 3], "TC": [2, 3], "ET": [3]},
    "regions_class_order": [1, 2, 3]

``regions_class_order[k]`` is the label value written where region k is predicted when nnU-Net exports a
segmentation (later regions overwrite earlier ones). By default it is, per region, the smallest of its values that no
later region contains (BraTS: 1, 2, 3); a region without such a value needs an explicit order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nnunet_mmssl.dataset_conversion.request import ConversionError, safe_name


def parse_region_specs(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["WT=1,2,3", "TC=2,3"]`` -> ``{"WT": [1, 2, 3], "TC": [2, 3]}`` (order kept).

    Raises:
        ConversionError: malformed entry, non-integer value, duplicate name.
    """
    regions: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        try:
            parsed = [int(v) for v in values.split(",")] if sep and values.strip() else []
        except ValueError:
            parsed = []
        if not name or not parsed:
            raise ConversionError(f"--regions {spec!r} is not NAME=VALUE,VALUE,... (e.g. WT=1,2,3)")
        safe_name(name, "region name", "--regions")
        if name in regions:
            raise ConversionError(f"--regions: region {name!r} is given twice")
        regions[name] = parsed
    return regions


def region_labels(labels: Mapping[str, int], regions: Mapping[str, Sequence[int]],
                  regions_class_order: Sequence[int] | None = None) -> tuple[dict, list[int]]:
    """The ``labels`` and ``regions_class_order`` entries of a region dataset's dataset.json.

    Args:
        labels: the declared label values of the label files (``{"background": 0, "edema": 1, ...}``).
        regions: region name -> label values it unites, in nnU-Net's output order.
        regions_class_order: label value written for each region at export (default: see module docstring).

    Raises:
        ConversionError: a region with an undeclared or background value, an empty region, a name clash with
            background, or an order of the wrong length / undeclared values / no default possible.
    """
    declared = {int(v) for v in labels.values()}
    if not regions:
        raise ConversionError("--regions needs at least one region NAME=VALUE,...")
    result: dict = {"background": 0}
    for name, values in regions.items():
        if name == "background":
            raise ConversionError("a region cannot be called 'background'")
        safe_name(name, "region name", "--regions")
        values = sorted({int(v) for v in values})
        bad = [v for v in values if v not in declared or v == 0]
        if not values or bad:
            raise ConversionError(f"region {name!r} = {values}: {bad or 'nothing'} is not a declared foreground "
                                  f"label value ({sorted(declared - {0})}); declare them with --labels")
        result[name] = values
    names = list(result)[1:]
    if regions_class_order is None:
        order = []
        for k, name in enumerate(names):
            later = {v for other in names[k + 1:] for v in result[other]}
            own = [v for v in result[name] if v not in later]
            if not own:
                raise ConversionError(f"region {name!r} has no value outside the later regions, so no default "
                                      f"export value: give --regions-class-order (one label value per region)")
            order.append(min(own))
    else:
        order = [int(v) for v in regions_class_order]
        if len(order) != len(names) or any(v not in declared or v == 0 for v in order):
            raise ConversionError(f"--regions-class-order {order}: one declared foreground label value per region "
                                  f"({len(names)} regions: {names})")
    return result, order
