//! The two ways into the kernel, and the common path to 64-bit Rust.
//!
//! * **PVH** (QEMU `-kernel`, our VMM, Xen-style loaders): the loader reads the Xen ELF note
//!   `PHYS32_ENTRY` and jumps to [`hvnet_pvh_entry`] in 32-bit protected mode, paging off,
//!   with `%ebx` = physical address of `hvm_start_info`.
//! * **Multiboot2** (GRUB on BIOS and UEFI disks): GRUB jumps to the ELF entry
//!   [`hvnet_multiboot2_entry`] in 32-bit protected mode with `%eax` = 0x36d76289 and
//!   `%ebx` = physical address of the boot information.
//!
//! Both record which protocol was used and the info pointer, build a temporary identity map
//! of the first 4 GiB with 2 MiB pages, enable long mode and call
//! `kernel_entry(protocol, info)`. Rust then replaces the temporary tables with its own
//! (section permissions, RAM only, MMIO uncached). Interrupts stay disabled throughout.

use core::arch::global_asm;

use super::info::PVH_MAGIC;

/// Size of the boot (and later main) kernel stack.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .set MB2_MAGIC, 0xE85250D6
    .set MB2_ARCH_I386, 0

    /* Multiboot2 header: magic, architecture, length, checksum, then tags. */
    .section .multiboot2, "a"
    .balign 8
mb2_header:
    .long MB2_MAGIC
    .long MB2_ARCH_I386
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (MB2_MAGIC + MB2_ARCH_I386 + (mb2_header_end - mb2_header))
    /* Information request: memory map (6), ACPI old/new RSDP (14/15), command line (1). */
    .balign 8
mb2_info_request:
    .short 1, 0
    .long mb2_info_request_end - mb2_info_request
    .long 1, 6, 14, 15
mb2_info_request_end:
    /* End tag. */
    .balign 8
    .short 0, 0
    .long 8
mb2_header_end:

    /* Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit PVH entry point. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long hvnet_pvh_entry

    .section .bss.boot_page_tables, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
boot_page_tables_end:

    .section .bss.boot_stack, "aw", @nobits
    .balign 4096
    .global hvnet_boot_stack_bottom
hvnet_boot_stack_bottom:
    .skip {stack_size}
    .global hvnet_boot_stack_top
hvnet_boot_stack_top:

    .section .rodata
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .text.boot, "ax"
    .code32
    .global hvnet_pvh_entry
hvnet_pvh_entry:
    cli
    cld
    mov ${pvh}, %ebp
    mov %ebx, %esi
    jmp 1f

    .global hvnet_multiboot2_entry
hvnet_multiboot2_entry:
    cli
    cld
    mov %eax, %ebp
    mov %ebx, %esi

1:  mov $hvnet_boot_stack_top, %esp

    /* Long mode available? CPUID 0x80000001 EDX bit 29. */
    mov $0x80000000, %eax
    cpuid
    cmp $0x80000001, %eax
    jb no_long_mode
    mov $0x80000001, %eax
    cpuid
    test $(1 << 29), %edx
    jz no_long_mode

    /* Zero the temporary page tables (the loader should have, but do not rely on it). */
    mov $boot_pml4, %edi
    mov $((boot_page_tables_end - boot_pml4) / 4), %ecx
    xor %eax, %eax
    rep stosl

    /* PML4[0] -> PDPT; PDPT[0..4] -> four page directories. */
    mov $boot_pdpt, %eax
    or $0x3, %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $0x3, %eax
    mov $boot_pdpt, %edi
    mov $4, %ecx
2:  mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    loop 2b

    /* 2048 2 MiB pages: identity map 0..4 GiB (present, writable, huge). */
    mov $boot_pd, %edi
    mov $0x83, %eax
    mov $2048, %ecx
3:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 3b

    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $(1 << 5), %eax          /* PAE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx       /* EFER */
    rdmsr
    or $(1 << 8), %eax          /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* PG | PE */
    mov %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode_entry

no_long_mode:
    mov $no_long_mode_msg, %esi
4:  lodsb
    test %al, %al
    jz 6f
    mov %al, %bl
    mov $0x3FD, %dx             /* COM1 line status: wait for transmit holding empty */
5:  in %dx, %al
    test $0x20, %al
    jz 5b
    mov $0x3F8, %dx
    mov %bl, %al
    out %al, %dx
    jmp 4b
6:  hlt
    jmp 6b

    .code64
long_mode_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $hvnet_boot_stack_top, %rsp
    mov %ebp, %edi              /* protocol */
    mov %esi, %esi              /* info pointer, zero-extended */
    xor %ebp, %ebp              /* terminate frame-pointer walks */
    call kernel_entry
7:  hlt
    jmp 7b

    .section .rodata
no_long_mode_msg:
    .asciz "hvnet: this CPU has no 64-bit long mode; cannot boot\r\n"

    .text
    "#,
    pvh = const PVH_MAGIC,
    stack_size = const BOOT_STACK_SIZE,
    options(att_syntax)
);
