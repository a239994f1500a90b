/* A bare arm64 Image for `cargo xtask kvmboot`: it does an MMIO access KVM cannot decode (a
 * load pair from the UART) and must get an external data abort for it, not stop the VM. Its
 * handler prints "D" (data abort, EC 0x25) or "X" (anything else) with a plain store, which
 * KVM decodes, and powers the VM off through PSCI. Built with aarch64-linux-gnu-as and
 * objcopy -O binary (xtask/src/guest.rs). */
	.text
	.globl	_start
_start:
	b	start			/* code0: past the header */
	.word	0			/* code1 */
	.quad	0			/* text_offset */
	.quad	_end - _start		/* image_size: the file itself */
	.quad	0b1010			/* flags: little endian, 4 KiB pages, placed anywhere */
	.quad	0, 0, 0
	.ascii	"ARM\x64"
	.word	0
start:
	adr	x3, vectors
	msr	vbar_el1, x3
	isb
	movz	x2, #0x900, lsl #16	/* the PL011 */
	ldp	x0, x1, [x2]		/* no syndrome: KVM cannot emulate it */
	b	.

	.balign	0x800
vectors:
	.skip	0x200
	/* Current EL with SP_ELx, synchronous. */
	mrs	x4, esr_el1
	lsr	x4, x4, #26
	cmp	x4, #0x25
	mov	w5, #'D'
	mov	w6, #'X'
	csel	w5, w5, w6, eq
	movz	x2, #0x900, lsl #16
	strb	w5, [x2]
	mov	w7, #'\n'
	strb	w7, [x2]
	movz	x0, #0x0008
	movk	x0, #0x8400, lsl #16	/* PSCI 0.2 SYSTEM_OFF */
	hvc	#0
	b	.
_end:
