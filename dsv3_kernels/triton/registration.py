"""How the Triton kernels become custom ops dsv3_kernels::<op>_triton, on a GPU and under
Triton's CPU interpreter.

On a GPU an op is a `torch.library.triton_op` launching its kernels through `wrap_triton`, so
torch.compile traces into it and sees the kernels.

Under TRITON_INTERPRET=1 (`INTERPRETED`: @triton.jit made interpreter functions when triton was
imported) the kernels are plain Python: wrap_triton cannot trace them into a graph (torch 2.14
returns them unchanged, older torch may raise) and they cannot run on fake tensors. So an op is an
opaque `custom_op` (torch.compile calls it instead of tracing into it) whose body doubles as the
fake kernel, with launches skipped on fake tensors. The interpreter's numerics differ too (casts,
bf16 dots): each module says how its kernels cope, keyed on INTERPRETED.

Every op first refuses what its kernels cannot take (`refuse`, with the public op's check from
ops.py: one check per op), so that a direct torch.ops call with a bad shape raises instead of
running a kernel out of bounds (a heap corruption in the interpreter, illegal accesses on a GPU).
"""

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


INTERPRETED = isinstance(_probe, InterpretedFunction)


def refuse(op, check, *args):
    """check(*args) (an ops.check_<op>), its TypeError / ValueError prefixed with the op's name."""
    try:
        check(*args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{op}: {e}") from None

if INTERPRETED:
    from torch._subclasses.fake_tensor import is_fake

    class _InterpretedLaunch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
                    self.kernel[grid](*args, **kwargs)
            return launch

    def wrap_triton(kernel):
        """Stand-in for torch.library.wrap_triton under the interpreter."""
        return _InterpretedLaunch(kernel)

    def custom_op(name, mutates_args=()):
        def register(fn):
            op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
            op.register_fake(fn)
            return op
        return register
else:
    from torch.library import wrap_triton  # noqa: F401  (re-exported for the op modules)

    def custom_op(name, mutates_args=()):
        return torch.library.triton_op(name, mutates_args=mutates_args)
