/* The seed's userspace snippet for the cross-VM connector (`cargo xtask kvmconn`), static
 * aarch64: open /dev/uioN, map BAR0 at offset 0 and BAR1 at getpagesize(), read the
 * connection's name from BAR0 and write to the dataport. Prints "@@ VALUE/RESULT" lines.
 *
 *   conntest seed                  the snippet, reading the name a byte at a time
 *   conntest send NAME OFF MSG     written plainly: the name with printf, MSG copied into the
 *                                  dataport at OFF (below 0: from its end) with strcpy, then
 *                                  an event
 *   conntest recv NAME OFF         waits for events until a message is at OFF, copies it out
 *                                  with memcpy and prints it
 *   conntest emit NAME N           N events at once, as fast as the CPU writes them
 *   conntest events NAME           every event received so far, as the driver counts them
 *                                  (sysfs `events` of the UIO device's PCI device)
 *   conntest loads KEY PATH [OFF]  maps PATH (a UIO device or a PCI resource file) and reads
 *                                  16 bytes at OFF with a load pair and a vector load, printing
 *                                  them or SIGBUS
 */
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
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

/* Opens the UIO device named NAME and maps its two maps as the seed does, the dataport whole
 * (its size from sysfs); an offset below 0 counts from the dataport's end. */
static long dataport_size;
static long at(long off)
{
	return off < 0 ? dataport_size + off : off;
}

static int open_named(const char *name, char **event, char **data)
{
	char path[64], got[64];
	for (int n = 0; n < 16; n++) {
		snprintf(path, sizeof(path), "/sys/class/uio/uio%d/name", n);
		FILE *f = fopen(path, "r");
		if (!f)
			continue;
		int ok = fgets(got, sizeof(got), f) != NULL;
		fclose(f);
		got[strcspn(got, "\n")] = 0;
		if (!ok || strcmp(got, name))
			continue;
		snprintf(path, sizeof(path), "/sys/class/uio/uio%d/maps/map1/size", n);
		f = fopen(path, "r");
		if (!f || fscanf(f, "%li", &dataport_size) != 1)
			break;
		fclose(f);
		snprintf(path, sizeof(path), "/dev/uio%d", n);
		int fd = open(path, O_RDWR);
		if (fd < 0)
			break;
		*event = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		*data = mmap(NULL, dataport_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
			     getpagesize());
		if (*event == MAP_FAILED || *data == MAP_FAILED)
			break;
		return fd;
	}
	fprintf(stderr, "no usable UIO device named %s\n", name);
	exit(1);
}

static int send_message(const char *name, long off, const char *msg)
{
	char *event, *data;
	open_named(name, &event, &data);
	/* The event page is read like memory: printf's string functions, as the seed shows. */
	printf("@@ VALUE send_name_%s %.50s\n", name, event + 8);
	strcpy(data + at(off), msg);
	*(volatile uint32_t *)event = 1;
	return 0;
}

static int receive_message(const char *name, long off)
{
	char *event, *data, msg[256];
	int fd = open_named(name, &event, &data);
	/* Events that came before this open are not waited for: look first. */
	off = at(off);
	for (int waits = 0; !data[off]; waits++) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		uint32_t count;
		if (waits > 100 || poll(&p, 1, 120000) != 1 || read(fd, &count, 4) != 4) {
			printf("@@ RESULT recv_%s FAIL no message\n", name);
			return 1;
		}
	}
	memcpy(msg, data + off, sizeof(msg));
	msg[sizeof(msg) - 1] = 0;
	printf("@@ VALUE recv_%s %s\n", name, msg);
	return 0;
}

static int emit(const char *name, long n)
{
	char *event, *data;
	struct timespec t0, t1;
	open_named(name, &event, &data);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < n; i++)
		*(volatile uint32_t *)event = 1;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("@@ VALUE emitted_%s %ld\n", name, n);
	/* What one emit costs the emitting vCPU (a trapped write: an exit to its VMM). */
	if (n > 0)
		printf("@@ VALUE emit_us %.1f\n",
		       ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 1e3 / n);
	return 0;
}

static int events(const char *name)
{
	char path[96], uio[32], link[64];
	char *event, *data;
	int fd = open_named(name, &event, &data);
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(link, uio, sizeof(uio) - 1);
	if (n <= 5)
		return 1;
	uio[n] = 0;
	snprintf(path, sizeof(path), "/sys/class/uio/%s/device/events", uio + 5);
	FILE *f = fopen(path, "r");
	unsigned long long total;
	if (!f || fscanf(f, "%llu", &total) != 1) {
		printf("@@ RESULT events_%s FAIL no %s\n", name, path);
		return 1;
	}
	printf("@@ VALUE events_%s %llu\n", name, total);
	return 0;
}

static sigjmp_buf bus_error;
static void on_sigbus(int sig)
{
	siglongjmp(bus_error, 1);
}

/* 16 bytes at p with one instruction that carries no syndrome (KVM cannot emulate it). */
static void print_loads(const char *key, const char *how, volatile char *p)
{
	uint64_t v[2];
	signal(SIGBUS, on_sigbus);
	if (sigsetjmp(bus_error, 1)) {
		printf("@@ VALUE loads_%s_%s SIGBUS\n", key, how);
		return;
	}
	if (!strcmp(how, "ldp"))
		asm volatile("ldp %0, %1, [%2]" : "=r"(v[0]), "=r"(v[1]) : "r"(p) : "memory");
	else
		asm volatile("ld1 {v0.16b}, [%1]\n\tst1 {v0.16b}, [%0]"
			     : : "r"(v), "r"(p) : "v0", "memory");
	printf("@@ VALUE loads_%s_%s ", key, how);
	for (int i = 0; i < 16; i++)
		printf("%02x", ((unsigned char *)v)[i]);
	printf("\n");
}

static int loads(const char *key, const char *path, long off)
{
	int fd = open(path, O_RDONLY);
	void *m = fd < 0 ? MAP_FAILED : mmap(NULL, 0x1000, PROT_READ, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED) {
		printf("@@ RESULT loads_%s FAIL cannot map %s\n", key, path);
		return 1;
	}
	print_loads(key, "ldp", (char *)m + off);
	print_loads(key, "ld1", (char *)m + off);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "seed"))
		return seed();
	if (argc == 5 && !strcmp(argv[1], "send"))
		return send_message(argv[2], strtol(argv[3], NULL, 0), argv[4]);
	if (argc == 4 && !strcmp(argv[1], "recv"))
		return receive_message(argv[2], strtol(argv[3], NULL, 0));
	if (argc == 4 && !strcmp(argv[1], "emit"))
		return emit(argv[2], strtol(argv[3], NULL, 0));
	if (argc == 3 && !strcmp(argv[1], "events"))
		return events(argv[2]);
	if ((argc == 4 || argc == 5) && !strcmp(argv[1], "loads"))
		return loads(argv[2], argv[3], argc == 5 ? strtol(argv[4], NULL, 0) : 0);
	fprintf(stderr, "usage: conntest seed | send NAME OFF MSG | recv NAME OFF | emit NAME N | "
			"events NAME | loads KEY PATH [OFF]\n");
	return 2;
}
