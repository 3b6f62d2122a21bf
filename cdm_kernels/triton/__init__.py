"""Triton kernels of cdm_kernels: backend "triton" of every op family (stf.py, rollout.py, levels.py),
on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
"""
