"""Triton kernels of medconv_ext, installed as medconv_ext.triton_kernels.

Kept light: importing this package does not import triton; each <op>.py module does.
"""
