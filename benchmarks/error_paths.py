"""Rejected arguments raise on a device, in a process of its own (run by gpu_check.sh, one device per call).

    python benchmarks/error_paths.py cpu|cuda

A crash while raising (a build whose C++ exceptions cannot unwind, for instance) would take a whole test
process down and hide which call did it; here it shows as this script's exit status, and the lines printed
before it name the calls that did raise cleanly. Exit 0: every call raised ValueError; 1: one was accepted
or raised something else.
"""

from __future__ import annotations

import sys

import torch

import cp_attention  # noqa: F401  (registers the ops)

OPS = torch.ops.cp_attention


def cases(dev: str) -> dict:
    """Calls that each raise ValueError from a different kernel file's argument checks."""
    q = torch.randn(1, 4, 6, 8, device=dev)
    lse = torch.zeros(1, 6, 4, device=dev)
    return {
        "flash_attn_fwd (float64 q)": lambda: OPS.flash_attn_fwd(q.double(), q, q, None, False, None),
        "flash_attn_fwd_acc_ (lse of the wrong shape)":
            lambda: OPS.flash_attn_fwd_acc_(q, q, q, q.clone(), lse[:, :, :3], None, False, None),
        "merge_attn_states (lse of the wrong shape)": lambda: OPS.merge_attn_states(q, lse, q, lse[:, :, :3]),
        "a2a_pack_seq_to_head (world_size > H)":
            lambda: OPS.a2a_pack_seq_to_head(q, q[:, :, :2], q[:, :, :2], 7),
        "a2a_unpack_head_to_seq (recv of the wrong size)":
            lambda: OPS.a2a_unpack_head_to_seq(q.reshape(-1), [3, 3], 1, 4, 7),
    }


def main() -> None:
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    bad = 0
    for name, call in cases(dev).items():
        print(f"{dev} {name}: ", end="", flush=True)
        try:
            call()
        except ValueError as exc:
            print("raised ValueError:", str(exc).splitlines()[0][:100], flush=True)
        except Exception as exc:  # noqa: BLE001  (reported, and counted as a failure)
            print(f"raised {type(exc).__name__} instead of ValueError:", str(exc).splitlines()[0][:100])
            bad += 1
        else:
            print("ACCEPTED")
            bad += 1
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
