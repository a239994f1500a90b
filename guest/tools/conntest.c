/* Guest side of the cross-VM connector test (`cargo xtask kvmconn`), static aarch64:
 *   conntest seed             the seed's userspace snippet, unchanged in substance: open
 *                             /dev/uio0, map BAR0 at offset 0 and BAR1 at getpagesize()
 *   conntest ping ROUNDS      send a message, emit, wait for the answer; check, repeat
 *   conntest pong ROUNDS      the other side: wait, check, answer
 * Messages carry a sequence number and a payload derived from it; each side checks the
 * other's. Prints "@@ VALUE name value" lines. */
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 256

/* MMIO accesses as single plain instructions: KVM on arm64 emulates only loads and stores
 * without writeback (what readb/writel in the kernel are); compilers like post-indexed ones. */
static inline uint8_t mmio_read8(const volatile void *p)
{
	uint8_t v;
	asm volatile("ldrb %w0, [%1]" : "=r"(v) : "r"(p) : "memory");
	return v;
}

static inline void mmio_write32(volatile void *p, uint32_t v)
{
	asm volatile("str %w0, [%1]" : : "r"(v), "r"(p) : "memory");
}

struct msg {
	volatile uint32_t seq;
	uint8_t payload[PAYLOAD];
};

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

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

/* Waits for the next event (the count changes); 0 on timeout. */
static int wait_event(int fd, int ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	uint32_t count;
	if (poll(&p, 1, ms) != 1)
		return 0;
	return read(fd, &count, 4) == 4;
}

static void fill(struct msg *m, uint32_t seq, uint8_t side)
{
	for (int i = 0; i < PAYLOAD; i++)
		m->payload[i] = (uint8_t)(seq * 31 + i * 7 + side);
	__sync_synchronize();
	m->seq = seq;
}

static int check(const struct msg *m, uint32_t seq, uint8_t side)
{
	if (m->seq != seq)
		return 0;
	for (int i = 0; i < PAYLOAD; i++)
		if (m->payload[i] != (uint8_t)(seq * 31 + i * 7 + side))
			return 0;
	return 1;
}

static int run(int ping, long rounds)
{
	int fd = open("/dev/uio0", O_RDWR);
	if (fd < 0) {
		perror("/dev/uio0");
		return 1;
	}
	long page = getpagesize();
	volatile uint32_t *event = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	uint8_t *data = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED, fd, page);
	if ((void *)event == MAP_FAILED || data == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	struct msg *to_b = (struct msg *)data, *to_a = (struct msg *)(data + 0x400);
	double *lat = calloc(rounds, sizeof(double));
	long ok = 0;
	if (!ping) {
		for (long i = 1; i <= rounds; i++) {
			while (!check(to_b, i, 1)) {
				if (!wait_event(fd, 60000)) {
					printf("@@ VALUE stopped_at %ld\n", i);
					goto out;
				}
			}
			fill(to_a, i, 2);
			mmio_write32(event, 1);
			ok++;
		}
	} else {
		for (long i = 1; i <= rounds; i++) {
			double t = now_us();
			fill(to_b, i, 1);
			mmio_write32(event, 1);
			/* An event sent before the peer is attached is dropped: send again every
			 * second (the peer checks the message, so an extra event is harmless). */
			for (int tries = 0; !check(to_a, i, 2); tries++) {
				if (tries == 120) {
					printf("@@ VALUE stopped_at %ld\n", i);
					goto out;
				}
				if (!wait_event(fd, 1000))
					mmio_write32(event, 1);
			}
			lat[ok++] = now_us() - t;
		}
		qsort(lat, ok, sizeof(double), cmp);
		printf("@@ VALUE rtt_median_us %.1f\n", lat[ok / 2]);
		printf("@@ VALUE rtt_p99_us %.1f\n", lat[ok * 99 / 100]);
	}
out:
	printf("@@ VALUE rounds_ok %ld\n", ok);
	return ok == rounds ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "seed"))
		return seed();
	if (argc == 3 && (!strcmp(argv[1], "ping") || !strcmp(argv[1], "pong")))
		return run(!strcmp(argv[1], "ping"), atol(argv[2]));
	fprintf(stderr, "usage: conntest seed | ping ROUNDS | pong ROUNDS\n");
	return 2;
}
