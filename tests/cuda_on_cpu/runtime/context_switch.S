// cudaemu_switch(void** save, void* new_sp): the fiber context switch of cudaemu.h (System V x86-64).
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save and continues on new_sp (a stack saved the same way, or a fresh fiber's
// initial frame built by run_block). glibc's swapcontext makes a system call per switch (4x slower).
  .text
  .globl cudaemu_switch
  .type cudaemu_switch, @function
cudaemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cudaemu_switch, .-cudaemu_switch
  .section .note.GNU-stack,"",@progbits
