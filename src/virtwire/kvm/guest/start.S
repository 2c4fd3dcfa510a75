/* virtwire kvm guest: 32-bit flat protected-mode entry and interrupt stubs.
 * The VMM enters at _start with CS=0x08 (flat code), DS/ES/SS=0x10 (flat data), interrupts off,
 * the GDT at 0x500 and the parameter block at 0x7000 (see vw.h). */
        .code32
        .section .text.start, "ax"
        .globl _start
_start:
        cli
        movl    $0x80000, %esp
        cld
        call    vw_main
        /* vw_main returned its status: report it on the exit port (0x5657 tag, see vw.h) */
        andl    $0xff, %eax
        orl     $0x56570000, %eax
        movw    $0x501, %dx
        outl    %eax, %dx
1:      cli
        hlt
        jmp     1b

        .text
/* Exceptions 0..31: push the vector and call vw_exception(vector, frame) (never returns). */
        .macro  EXC n
        .globl  exc\n
exc\n:  pushl   $\n
        jmp     exc_common
        .endm
        .irp    n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        EXC     \n
        .endr
exc_common:
        movl    %esp, %eax
        pushl   %eax
        pushl   (%eax)
        call    vw_exception
2:      cli
        hlt
        jmp     2b

/* IRQs 0..15 (vectors 0x20..0x2f): save registers, vw_irq(irq), restore, return.
 * Not iret: this host's KVM emulates CPL0 code and its emulator implements iret only in real
 * mode (KVM_EXIT_INTERNAL_ERROR). The same-privilege return is done by hand: restore EFLAGS
 * from a copy, then "ret $8" pops EIP and drops CS and EFLAGS. An interrupt arriving between
 * popfl and ret nests on this stack and returns here. */
        .macro  IRQ n
        .globl  irq\n
irq\n:  pushal
        pushl   $\n
        call    vw_irq
        addl    $4, %esp
        popal
        pushl   8(%esp)
        popfl
        ret     $8
        .endm
        .irp    n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        IRQ     \n
        .endr

        .section .rodata
        .globl  vw_exc_stubs
vw_exc_stubs:
        .irp    n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .long   exc\n
        .endr
        .globl  vw_irq_stubs
vw_irq_stubs:
        .irp    n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        .long   irq\n
        .endr
