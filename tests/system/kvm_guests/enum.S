/* A user's flat binary for `virtwire kvm --guest FILE.bin`: starts at the real-mode reset vector
 * (F000:FFF0), enumerates PCI bus 0 through 0xCF8/0xCFC and prints every function it finds:
 * "pci SS id=DDDDVVVV class=CCCCCCRR bar0=... bar4=... size4=..." on COM1, then exits (0x501). */
        .code16
        .text
        .globl _start
_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ss
        movw    $0x7000, %sp
        xorl    %esi, %esi
scan:
        movl    %esi, %edi
        shll    $11, %edi
        orl     $0x80000000, %edi
        movl    %edi, %eax
        call    cfgrd
        cmpl    $0xffffffff, %eax
        je      next
        movl    %eax, %ebp
        movb    $'p', %al
        call    putc
        movb    $'c', %al
        call    putc
        movb    $'i', %al
        call    putc
        movb    $' ', %al
        call    putc
        movl    %esi, %eax
        shll    $24, %eax
        movw    $2, %cx
        call    hexn
        movb    $'=', %al
        call    putc
        movl    %ebp, %eax
        call    hex8
        movl    %edi, %eax
        orl     $0x08, %eax
        call    cfgrd
        call    sphex
        movl    %edi, %eax
        orl     $0x10, %eax
        call    cfgrd
        call    sphex
        movl    %edi, %eax
        orl     $0x20, %eax
        call    cfgrd
        call    sphex
        movl    %edi, %eax             /* size BAR4: write all ones, read, restore 0 */
        orl     $0x20, %eax
        movl    $0xffffffff, %ecx
        call    cfgwr
        movl    %edi, %eax
        orl     $0x20, %eax
        call    cfgrd
        call    sphex
        movl    %edi, %eax
        orl     $0x20, %eax
        xorl    %ecx, %ecx
        call    cfgwr
        movb    $'\n', %al
        call    putc
next:
        incl    %esi
        cmpl    $32, %esi
        jb      scan
        movl    $0x56570000, %eax
        movw    $0x501, %dx
        outl    %eax, %dx
1:      hlt
        jmp     1b

cfgrd:  movw    $0xcf8, %dx
        outl    %eax, %dx
        movw    $0xcfc, %dx
        inl     %dx, %eax
        ret
cfgwr:  movw    $0xcf8, %dx
        outl    %eax, %dx
        movw    $0xcfc, %dx
        movl    %ecx, %eax
        outl    %eax, %dx
        ret
sphex:  pushl   %eax
        movb    $' ', %al
        call    putc
        popl    %eax
hex8:   movw    $8, %cx
hexn:   roll    $4, %eax
        pushl   %eax
        andb    $0xf, %al
        addb    $'0', %al
        cmpb    $'9', %al
        jbe     2f
        addb    $('a' - '9' - 1), %al
2:      call    putc
        popl    %eax
        loop    hexn
        ret
putc:   pushw   %dx
        movw    $0x3f8, %dx
        outb    %al, %dx
        popw    %dx
        ret

        .org    0xff0
reset:  jmp     _start
        .org    0x1000
