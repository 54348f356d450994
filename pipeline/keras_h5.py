"""Read weights from the HDF5 layout that Keras 2 wrote, and assign them by name or order.

Keras 2 wrote two layouts. ``model.save_weights("x.h5")`` puts the attribute
``layer_names`` on the file's root, one group per layer with a ``weight_names``
attribute, and one dataset per weight at ``<layer>/<weight name>`` (for example
``conv1/conv/conv1/conv/kernel:0``). ``model.save("x.h5")`` writes the same tree under a
``model_weights`` group, next to ``model_config``. A nested model (a DenseNet used as one
layer) is one group whose ``weight_names`` list every weight of the inner model. Attributes
over 64 KB were split into ``name0``, ``name1``, and so on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import keras
import numpy as np

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
EXPECTED_FORMAT = (
    "DenseNet-121 plus a Dense(14) sigmoid head saved by Keras 2 save_weights or model.save in HDF5 format"
)


class WeightsError(PipelineError, ValueError):
    """Raised when a weights file is missing or does not match the expected network."""


def read_legacy_weights(path: Path) -> list[tuple[str, np.ndarray]]:
    """Return every ``(weight name, value)`` of a Keras 2 HDF5 file, in file order.

    Names are as stored, such as ``conv1/bn/gamma:0``. Raises WeightsError when the file
    is not in one of the two Keras 2 layouts, lacks a group or dataset that its name lists
    promise, or cannot be read (a truncated or corrupt file).
    """
    try:
        with h5py.File(path, "r") as handle:
            return _read_pairs(_weights_root(handle, path), path)
    except OSError as error:
        raise WeightsError(
            f"{path}: unreadable HDF5 file, probably truncated or corrupt ({' '.join(str(error).split())}). "
            f"Expected {EXPECTED_FORMAT}; copy or download the file again"
        ) from None


def _read_pairs(root: h5py.Group, path: Path) -> list[tuple[str, np.ndarray]]:
    pairs: list[tuple[str, np.ndarray]] = []
    for layer_name in read_name_list(root, "layer_names"):
        layer = root.get(layer_name)
        if not isinstance(layer, h5py.Group):
            raise WeightsError(
                f"{path}: layer_names lists {layer_name!r}, but the file has no group of that name. "
                f"Expected {EXPECTED_FORMAT}"
            )
        for weight_name in read_name_list(layer, "weight_names"):
            weight = layer.get(weight_name)
            if not isinstance(weight, h5py.Dataset):
                raise WeightsError(
                    f"{path}: layer {layer_name!r} lists the weight {weight_name!r}, but the file has no dataset "
                    f"of that name. Expected {EXPECTED_FORMAT}"
                )
            pairs.append((weight_name, np.asarray(weight)))
    return pairs


def _weights_root(handle: h5py.File, path: Path) -> h5py.Group:
    if _has_attribute(handle, "layer_names"):
        return handle
    if "model_weights" in handle and _has_attribute(handle["model_weights"], "layer_names"):
        return handle["model_weights"]
    if "layers" in handle or "_layer_checkpoint_dependencies" in handle:
        raise WeightsError(
            f"{path}: this is a Keras 3 weights file (.weights.h5); convert it by loading it into a "
            "Keras 3 DenseNet-121 model and saving that with legacy HDF5 save_weights, or give the original "
            "Keras 2 file"
        )
    raise WeightsError(
        f"{path}: HDF5 file without the Keras 2 'layer_names' attribute or a 'model_weights' group. "
        f"Expected {EXPECTED_FORMAT}"
    )


def _has_attribute(group: h5py.Group, name: str) -> bool:
    return name in group.attrs or f"{name}0" in group.attrs


def read_name_list(group: h5py.Group, name: str) -> list[str]:
    """Read a list-of-strings attribute, joining the parts Keras split it into when large."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values = []
        part = 0
        while f"{name}{part}" in group.attrs:
            values.extend(group.attrs[f"{name}{part}"])
            part += 1
    return [value.decode("utf8") if isinstance(value, bytes) else str(value) for value in values]


def comparable_name(name: str) -> str:
    """Map a Keras 2 or Keras 3 weight name to one spelling.

    Keras 2 wrote ``conv1/conv/kernel:0`` where Keras 3 names the same weight
    ``conv1_conv/kernel``; both become ``conv1_conv_kernel``.
    """
    if name.endswith(":0"):
        name = name[:-2]
    return name.replace("/", "_")


def model_weight_names(model: keras.Model) -> list[tuple[str, keras.Variable]]:
    """Return ``(layer/weight, variable)`` in Keras 2's order: per layer, trainable then not."""
    return [
        (f"{layer.name}/{variable.name}", variable)
        for layer in model.layers
        for variable in [*layer.trainable_weights, *layer.non_trainable_weights]
    ]


def assign_weights(model: keras.Model, pairs: list[tuple[str, np.ndarray]], source: str) -> str:
    """Assign every weight of ``model`` from ``pairs``; return "name" or "order", how they matched.

    Names are compared after :func:`comparable_name`. When some model weight has no
    namesake in ``pairs``, the weights are matched by position, as Keras 2's
    ``load_weights`` did, provided the counts and every shape agree. Raises WeightsError
    naming the first weight that does not fit.
    """
    targets = model_weight_names(model)
    by_name = {comparable_name(name): value for name, value in pairs}
    if all(comparable_name(name) in by_name for name, _ in targets):
        values = [by_name[comparable_name(name)] for name, _ in targets]
        matched = "name"
    elif len(pairs) == len(targets):
        values = [value for _, value in pairs]
        matched = "order"
    else:
        missing = next(name for name, _ in targets if comparable_name(name) not in by_name)
        raise WeightsError(
            f"{source}: contains {len(pairs)} weights, the model expects {len(targets)}, and the names differ "
            f"(no weight for {missing}). Expected DenseNet-121 plus a Dense(14) sigmoid head"
        )
    for (name, variable), value in zip(targets, values, strict=True):
        if tuple(value.shape) != tuple(variable.shape):
            raise WeightsError(
                f"{source}: weight {name} has shape {tuple(value.shape)} in the file, the model expects "
                f"{tuple(variable.shape)} (matched by {matched}). Expected DenseNet-121 plus a Dense(14) sigmoid head"
            )
    for (_, variable), value in zip(targets, values, strict=True):
        variable.assign(value.astype(variable.dtype))
    return matched


def split_head(pairs: list[tuple[str, np.ndarray]], source: str) -> tuple[list[tuple[str, np.ndarray]], int]:
    """Remove a ``Dense(classes)`` head from ``pairs``; return the other pairs and the class count.

    DenseNet-121 has no 2-D weight, so the head is the one 2-D kernel (1024, classes) and
    the bias (classes,) stored right after it. Without a head the class count is 0.
    """
    kernels = [index for index, (_, value) in enumerate(pairs) if value.ndim == 2]
    if not kernels:
        return pairs, 0
    if len(kernels) > 1:
        names = ", ".join(pairs[index][0] for index in kernels)
        raise WeightsError(f"{source}: {len(kernels)} dense layers ({names}); expected DenseNet-121 plus one Dense(14) sigmoid head")
    index = kernels[0]
    kernel = pairs[index][1]
    if index + 1 >= len(pairs) or pairs[index + 1][1].shape != (kernel.shape[1],):
        raise WeightsError(f"{source}: dense kernel {pairs[index][0]} is not followed by its bias; the file is not a Keras 2 weights file")
    return pairs[:index] + pairs[index + 2 :], int(kernel.shape[1])
