"""Every kernel compiles ahead of time for sm_80 and sm_90 at its shipped configs, without spills,
both with no specialization hints (strided inputs) and with the hints contiguous, 16-aligned inputs get.

The interpreter accepts code the GPU compiler rejects, so this runs the real compiler, in a
subprocess without TRITON_INTERPRET (Triton reads it when kernels are defined).
"""

import os
import subprocess
import sys


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = (
        "from fused_pref.tools.aot import build_all, format_table\n"
        "builds = build_all()\n"
        "print(format_table(builds))\n"
        "print('KERNELS', sorted({b.kernel for b in builds}), 'ARCHS', sorted({b.arch for b in builds}),\n"
        "      'LAYOUTS', sorted({b.layout for b in builds}))\n"
        "print('SPILLS', sum(b.spill_stores + b.spill_loads for b in builds))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[-2] == ("KERNELS ['column_sum', 'linear_grad', 'linear_grad_fused', 'linear_lse', 'logit_sum', "
                         "'pref_head'] ARCHS [80, 90] LAYOUTS ['aligned', 'strided']"), done.stdout
    assert lines[-1] == "SPILLS 0", done.stdout
