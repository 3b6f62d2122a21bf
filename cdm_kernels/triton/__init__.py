"""Triton kernels of cdm_kernels: backend "triton" of every op family (registered, with the other
backends, in cdm_kernels/backends.py; these modules are imported on first use).

    stf.py       stf_forward, stf_backward          (op family stf_target)
    rollout.py   rollout_step, martingale_loss_*,   (rollout_step, martingale_loss, randn)
                 philox_randn

They run on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before triton was first
imported (the Triton interpreter: how the tests run them without a GPU).
"""
