/* Guest-side I/O benchmark for `cargo xtask bench io` (static aarch64, no libc extras):
 *   iobench seq-write DEV MIB     sequential 1 MiB writes with O_DIRECT, then fsync
 *   iobench seq-read DEV MIB      sequential 1 MiB reads with O_DIRECT
 *   iobench rand-read DEV SECONDS 4 KiB reads at random aligned offsets, O_DIRECT
 *   iobench rand-write DEV SECONDS the same with writes
 *   iobench file-read FILE        the whole file in 1 MiB reads through the page cache,
 *                                 emptied first (a file system's own read path: virtio-fs
 *                                 or ext4 on virtio-blk); also prints its checksum
 *   iobench tcp-send IP PORT MIB  MIB of zeros over one TCP connection
 *   iobench tcp-rr IP PORT SECONDS one byte to an echo server and back, over and over
 * Each prints one line: "@@ VALUE <name> <number>" (MB/s or IOPS), read by the xtask. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <netinet/tcp.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int open_dev(const char *path, int flags)
{
	int fd = open(path, flags | O_DIRECT);
	if (fd < 0) {
		perror(path);
		exit(1);
	}
	return fd;
}

static void *aligned(size_t n)
{
	void *p;
	if (posix_memalign(&p, 4096, n)) {
		perror("posix_memalign");
		exit(1);
	}
	memset(p, 0xa5, n);
	return p;
}

static int seq(const char *dev, long mib, int writing)
{
	int fd = open_dev(dev, writing ? O_WRONLY : O_RDONLY);
	char *buf = aligned(1 << 20);
	double t0 = now();
	for (long i = 0; i < mib; i++) {
		ssize_t n = writing ? pwrite(fd, buf, 1 << 20, (off_t)i << 20)
				    : pread(fd, buf, 1 << 20, (off_t)i << 20);
		if (n != 1 << 20) {
			perror(writing ? "pwrite" : "pread");
			return 1;
		}
	}
	if (writing && fsync(fd)) {
		perror("fsync");
		return 1;
	}
	double dt = now() - t0;
	printf("@@ VALUE %s_mbps %.1f\n", writing ? "seq_write" : "seq_read", mib * 1.048576 / dt);
	return 0;
}

static int file_read(const char *path)
{
	/* Nothing of any file in the guest's page cache: the reads reach the device. */
	sync();
	int dc = open("/proc/sys/vm/drop_caches", O_WRONLY);
	if (dc < 0 || write(dc, "3\n", 2) != 2) {
		perror("drop_caches");
		return 1;
	}
	close(dc);
	int fd = open(path, O_RDONLY);
	if (fd < 0) {
		perror(path);
		return 1;
	}
	char *buf = aligned(1 << 20);
	uint64_t total = 0, sum = 0;
	double t0 = now();
	for (;;) {
		ssize_t n = read(fd, buf, 1 << 20);
		if (n < 0) {
			perror("read");
			return 1;
		}
		if (n == 0)
			break;
		for (ssize_t i = 0; i < n; i += 4096)
			sum = sum * 31 + (unsigned char)buf[i];
		total += n;
	}
	double dt = now() - t0;
	close(fd);
	printf("@@ VALUE file_read_mbps %.1f\n", total / 1e6 / dt);
	printf("@@ VALUE file_read_sum %llu %016llx\n", (unsigned long long)total,
	       (unsigned long long)sum);
	return 0;
}

static int rand_io(const char *dev, double seconds, int writing)
{
	int fd = open_dev(dev, writing ? O_WRONLY : O_RDONLY);
	uint64_t size = 0;
	if (ioctl(fd, BLKGETSIZE64, &size) || size < 8192) {
		fprintf(stderr, "%s: no size\n", dev);
		return 1;
	}
	char *buf = aligned(4096);
	uint64_t blocks = size / 4096, x = 88172645463325252ull, ops = 0;
	double t0 = now(), t;
	do {
		for (int i = 0; i < 64; i++) {
			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			off_t at = (off_t)(x % blocks) * 4096;
			if ((writing ? pwrite(fd, buf, 4096, at) : pread(fd, buf, 4096, at)) != 4096) {
				perror(writing ? "pwrite" : "pread");
				return 1;
			}
			ops++;
		}
		t = now();
	} while (t - t0 < seconds);
	printf("@@ VALUE %s_iops %.0f\n", writing ? "rand_write" : "rand_read", ops / (t - t0));
	printf("@@ VALUE %s_ops %llu\n", writing ? "rand_write" : "rand_read", (unsigned long long)ops);
	return 0;
}

/* A TCP connection to ip:port (the board's server may take a moment to come up): -1 if none. */
static int dial(const char *ip, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
		return -1;
	int s = socket(AF_INET, SOCK_STREAM, 0);
	for (int tries = 0; connect(s, (struct sockaddr *)&a, sizeof a); tries++) {
		if (tries > 100) {
			perror("connect");
			return -1;
		}
		sleep(1);
	}
	return s;
}

static int tcp_send(const char *ip, int port, long mib)
{
	int s = dial(ip, port);
	if (s < 0)
		return 1;
	static char buf[1 << 16];
	double t0 = now();
	for (long sent = 0; sent < mib << 20;) {
		ssize_t n = send(s, buf, sizeof buf, 0);
		if (n <= 0) {
			perror("send");
			return 1;
		}
		sent += n;
	}
	shutdown(s, SHUT_WR);
	/* The receiver closes after it has read everything: that is the end of the transfer. */
	while (recv(s, buf, sizeof buf, 0) > 0)
		;
	printf("@@ VALUE tcp_mbps %.1f\n", mib * 1.048576 / (now() - t0));
	return 0;
}

static int tcp_rr(const char *ip, int port, double seconds)
{
	int s = dial(ip, port), one = 1;
	if (s < 0)
		return 1;
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	char c = 'x';
	long n = 0;
	double t0 = now(), t;
	do {
		if (send(s, &c, 1, 0) != 1 || recv(s, &c, 1, MSG_WAITALL) != 1) {
			perror("tcp-rr");
			return 1;
		}
		n++;
		t = now();
	} while (t - t0 < seconds);
	printf("@@ VALUE tcp_rr_us %.1f\n", (t - t0) * 1e6 / n);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "seq-write"))
		return seq(argv[2], atol(argv[3]), 1);
	if (argc == 4 && !strcmp(argv[1], "seq-read"))
		return seq(argv[2], atol(argv[3]), 0);
	if (argc == 4 && !strcmp(argv[1], "rand-read"))
		return rand_io(argv[2], atof(argv[3]), 0);
	if (argc == 4 && !strcmp(argv[1], "rand-write"))
		return rand_io(argv[2], atof(argv[3]), 1);
	if (argc == 3 && !strcmp(argv[1], "file-read"))
		return file_read(argv[2]);
	if (argc == 5 && !strcmp(argv[1], "tcp-send"))
		return tcp_send(argv[2], atoi(argv[3]), atol(argv[4]));
	if (argc == 5 && !strcmp(argv[1], "tcp-rr"))
		return tcp_rr(argv[2], atoi(argv[3]), atof(argv[4]));
	fprintf(stderr, "usage: iobench seq-write|seq-read DEV MIB | rand-read|rand-write DEV SECONDS"
			" | file-read FILE | tcp-send IP PORT MIB | tcp-rr IP PORT SECONDS\n");
	return 2;
}
