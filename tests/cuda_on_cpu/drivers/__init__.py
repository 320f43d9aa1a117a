"""One module per csrc/cuda/<source>.cu, named after it, testing the ops that file registers for CUDA
(run.py finds them all; docs/cuda_on_cpu.md, "Adding a CUDA source"). Each module defines:

  SOURCE              the .cu file name
  OPS                 the op names it tests (torch.ops.cudaemu.<op>, as registered by the file)
  fixed_cases()       the case list shared with the GPU tests (tests/_<op>_gpu_util.py), ids first
  fuzz_cases(rnd, n)  n random valid cases drawn from random.Random rnd, same layout
  run(case, dtypes, t)  computes the float64 reference and calls
                      t.check(case_id, dtype, op_label, t.ops.<op>, args, expected, (rtol, atol))
                      for every op; t.wmma says whether opt-in tensor-core paths should run too
"""
