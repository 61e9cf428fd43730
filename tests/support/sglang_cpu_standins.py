"""Test-only stand-ins that let SGLang (0.5.19 and 0.5.23) import on a CPU-only machine.

SGLang imports two things at module import time that have no working CPU build on PyPI:

1. ``torchvision`` (``sglang.srt.utils.common`` does ``from torchvision.io import decode_jpeg``; some
   config modules import ``torchvision.transforms.InterpolationMode``). PyPI's torchvision fails next to the
   CPU torch build ("operator torchvision::nms does not exist").
2. ``sgl_kernel`` CPU ops, imported under ``if _is_cpu:`` by the KV-move, allocation and speculative
   decoding modules.

:func:`install` appends an import finder to the *end* of ``sys.meta_path``: it serves the stand-in modules
only for names no real installed package provides (a working torchvision or sgl_kernel always wins), and
only when something imports them. It must run before ``transformers`` is first imported, because
transformers decides once whether torchvision exists; the SGLang test venv therefore runs it at interpreter
start from a one-line ``.pth`` file (see docs/sglang.md, "Install"), which also covers SGLang's spawned
scheduler processes. Nothing here is used by the radix cache, the memory pools or the allocator that the
adapter tests exercise: the stand-ins exist purely so that ``import sglang.srt.mem_cache.radix_cache``
succeeds.

Ops whose semantics are simple are implemented in plain torch (and tested against their documented
semantics in ``tests/adapters/sglang/test_cpu_standins.py``); every other op raises ``NotImplementedError``
naming itself, so a code path that would need it fails loudly instead of computing garbage.
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by whoever calls an op; importing this module stays cheap
    import torch

STANDIN_MARKER = "__kvpolicy_cpu_standin__"


# --------------------------------------------------------------------------------------------------
# sgl_kernel CPU ops
# --------------------------------------------------------------------------------------------------


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's newly allocated KV slots into its ``req_to_token`` row, in place.

    For request ``i`` (in batch order): ``req_to_token[req_pool_indices[i], start[i]:end[i]] =
    out_cache_loc[o_i : o_i + end[i] - start[i]]`` where ``o_i`` is the sum of the previous requests'
    ``end - start`` (``out_cache_loc`` is the batch's slots packed request after request).
    ``pool_len`` is the row width of ``req_to_token`` (checked, not otherwise needed in torch).
    """
    if req_to_token.dim() != 2 or req_to_token.shape[1] != pool_len:
        raise ValueError(f"req_to_token must be (rows, {pool_len}), got {tuple(req_to_token.shape)}")
    offset = 0
    for i in range(req_pool_indices.shape[0]):
        row = int(req_pool_indices[i])
        start, end = int(start_offset[i]), int(end_offset[i])
        count = end - start
        if count < 0:
            raise ValueError(f"request {i}: end_offset {end} < start_offset {start}")
        req_to_token[row, start:end] = out_cache_loc[offset:offset + count].to(req_to_token.dtype)
        offset += count


def _not_implemented(name: str, why: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is a kvpolicy test stand-in without an implementation ({why}); "
            "this code path needs the real sgl_kernel CPU build"
        )

    op.__name__ = name
    op.__qualname__ = name
    op.__doc__ = f"Stand-in for ``sgl_kernel.{name}``: raises NotImplementedError ({why})."
    return op


# Raw-pointer or speculative-decoding ops: not simple to express faithfully in plain torch.
_NOT_IMPLEMENTED_OPS = {
    "copy_all_layer_kv_cache_cpu": "copies rows between raw buffer pointers; used by KV-move paths only",
    "build_tree_kernel_efficient_cpu": "speculative decoding (EAGLE tree build)",
    "verify_tree_greedy_cpu": "speculative decoding (EAGLE verify)",
    "assign_extend_cache_locs_cpu": "speculative decoding",
    "fill_accept_out_cache_loc_cpu": "speculative decoding",
    "fill_bonus_tokens_cpu": "speculative decoding",
    "rotate_input_ids_cpu": "multi-layer EAGLE speculative decoding",
    "assign_draft_cache_locs_contiguous_cpu": "speculative decoding (EAGLE draft)",
    "build_draft_decode_metadata_cpu": "Intel AMX attention backend",
}

IMPLEMENTED_OPS = ("assign_req_to_token_pool_cpu",)


def _fill_sgl_kernel(module: types.ModuleType) -> None:
    module.assign_req_to_token_pool_cpu = assign_req_to_token_pool_cpu
    for name, why in _NOT_IMPLEMENTED_OPS.items():
        setattr(module, name, _not_implemented(name, why))


# --------------------------------------------------------------------------------------------------
# torchvision names
# --------------------------------------------------------------------------------------------------


class InterpolationMode(enum.Enum):
    """Same members and string values as ``torchvision.transforms.InterpolationMode``."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class ImageReadMode(enum.Enum):
    """Same members and values as ``torchvision.io.ImageReadMode``."""

    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


def _no_images(qualname: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"{qualname} is a kvpolicy test stand-in: no image processing on this setup")

    fn.__name__ = qualname.rsplit(".", 1)[-1]
    fn.__qualname__ = fn.__name__
    return fn


# Every name SGLang (0.5.19, 0.5.23) or transformers (5.12, 5.19) imports from torchvision at module import time on
# the paths the tests take. Image functions raise NotImplementedError: nothing text-only calls them.
_TORCHVISION_NAMES: dict[str, tuple[str, ...]] = {
    "torchvision": (),
    "torchvision.io": ("decode_jpeg", "decode_image", "read_image"),
    "torchvision.transforms": (),
    "torchvision.transforms.functional": ("pil_to_tensor", "to_pil_image", "resize", "normalize"),
    "torchvision.transforms.v2": (),
    "torchvision.transforms.v2.functional": ("resize", "normalize", "pad", "center_crop", "to_dtype",
                                             "grayscale_to_rgb", "rgb_to_grayscale"),
    "torchvision.ops": ("masks_to_boxes", "batched_nms", "nms"),
    "torchvision.ops.boxes": ("batched_nms", "nms"),
}


def _fill_torchvision(module: types.ModuleType) -> None:
    name = module.__name__
    for fn in _TORCHVISION_NAMES[name]:
        setattr(module, fn, _no_images(f"{name}.{fn}"))
    if name == "torchvision":
        module.__version__ = "0.0.0+kvpolicy.standin"
    if name == "torchvision.io":
        module.ImageReadMode = ImageReadMode
    if name.startswith("torchvision.transforms"):
        module.InterpolationMode = InterpolationMode


class _StandinLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module: types.ModuleType) -> None:
        setattr(module, STANDIN_MARKER, True)
        if module.__name__ == "sgl_kernel":
            _fill_sgl_kernel(module)
        else:
            _fill_torchvision(module)


class StandinFinder(importlib.abc.MetaPathFinder):
    """Serves ``sgl_kernel`` and the listed ``torchvision`` modules; consulted after every real finder."""

    __kvpolicy_cpu_standin__ = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "sgl_kernel" and fullname not in _TORCHVISION_NAMES:
            return None
        is_package = any(other.startswith(fullname + ".") for other in _TORCHVISION_NAMES)
        return importlib.util.spec_from_loader(fullname, _StandinLoader(), is_package=is_package)


def install() -> bool:
    """Append the stand-in finder to ``sys.meta_path`` (idempotent). Returns True if this call added it."""
    # Compare by marker, not class: the .pth bootstrap and the test conftest may load two copies of this file.
    if any(getattr(finder, STANDIN_MARKER, False) for finder in sys.meta_path):
        return False
    torchvision_missing = "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None
    if "transformers" in sys.modules and torchvision_missing:
        raise RuntimeError(
            "install the SGLang CPU stand-ins before transformers is imported (transformers caches whether "
            "torchvision exists); see docs/sglang.md for the .pth line that does it at interpreter start"
        )
    sys.meta_path.append(StandinFinder())
    return True


def is_standin(module: types.ModuleType) -> bool:
    return bool(getattr(module, STANDIN_MARKER, False))


def pth_line(path: str | None = None) -> str:
    """The one-line ``.pth`` content that installs the stand-ins at interpreter start from this file."""
    path = path or __file__
    return (
        "import importlib.util as _u; _s = _u.spec_from_file_location('kvpolicy_sglang_cpu_standins', "
        f"{str(path)!r}); _m = _u.module_from_spec(_s); _s.loader.exec_module(_m); _m.install()"
    )


if __name__ == "__main__":  # python tests/support/sglang_cpu_standins.py > VENV/site-packages/x.pth
    print(pth_line(__import__("os").path.abspath(__file__)))
