/* The seed's userspace snippet for the cross-VM connector (`cargo xtask kvmconn`), static
 * aarch64, unchanged in substance: open /dev/uio0, map BAR0 at offset 0 and BAR1 at
 * getpagesize(), read the connection's name from BAR0 and write to the dataport. Prints
 * "@@ VALUE/RESULT" lines. The exchanges themselves use the Rust library (`conn`). */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* MMIO accesses as single plain instructions: KVM on arm64 emulates only loads and stores
 * without writeback (what readb/writel in the kernel are); compilers like post-indexed ones. */
static inline uint8_t mmio_read8(const volatile void *p)
{
	uint8_t v;
	asm volatile("ldrb %w0, [%1]" : "=r"(v) : "r"(p) : "memory");
	return v;
}

static int seed(void)
{
	int fd = open("/dev/uio0", O_RDWR);
	if (fd < 0) {
		perror("/dev/uio0");
		return 1;
	}
	// Map event register (BAR0)
	void *event = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	// Map dataport (BAR1)
	void *data = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED, fd, getpagesize());
	if (event == MAP_FAILED || data == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	/* The event page is MMIO that the hypervisor emulates: read it a byte at a time (string
	 * functions may use vector or paired loads, which KVM cannot emulate on arm64). */
	char name[50];
	for (int i = 0; i < 50; i++)
		name[i] = mmio_read8((char *)event + 8 + i);
	name[49] = 0;
	printf("@@ VALUE seed_name %s\n", name);
	memcpy((char *)data + 0x800, "seed-snippet", 13);
	printf("@@ RESULT seed_snippet %s\n", memcmp((char *)data + 0x800, "seed-snippet", 13) ? "FAIL" : "PASS");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "seed"))
		return seed();
	fprintf(stderr, "usage: conntest seed\n");
	return 2;
}
