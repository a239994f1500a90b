/* Both ends of an echo over virtio-vsock, static aarch64, for the vhost-user test
 * (`cargo xtask kvmvhost`; the device served by vhost-device-vsock, whose host side is a Unix
 * socket speaking "CONNECT <port>\n" / "OK <port>\n"):
 *
 *   vsockecho listen PORT              in the guest: echoes one connection back, checking
 *                                      what arrives against the same stream, then
 *                                      @@ VALUE vsock_echoed BYTES
 *                                      @@ VALUE vsock_received ok (or where it differed)
 *   vsockecho call UDS PORT BYTES      on the host: sends BYTES of a pseudo-random stream
 *                                      and checks the echo, then
 *                                      @@ VALUE vsock_echo ok BYTES (or a line saying where
 *                                      it differed)
 *
 * "call" retries the connection while the guest's listener is not there yet (the backend
 * closes the Unix connection then), at most 100 times.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static void fail(const char *what)
{
	printf("@@ VALUE vsock_echo failed: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* Byte i of the stream (xorshift over the index: any byte can be checked alone). */
static uint8_t stream(uint64_t i)
{
	uint64_t x = i * 0x9e3779b97f4a7c15ull + 1;
	x ^= x >> 31;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 29;
	return (uint8_t)x;
}

static int listen_echo(unsigned port)
{
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		fail("socket(AF_VSOCK)");
	if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 1) < 0)
		fail("bind/listen");
	printf("@@ VSOCK LISTENING %u\n", port);
	fflush(stdout);
	/* A caller that never comes must not hold the guest forever (it fails the test then). */
	alarm(120);
	int c = accept(s, NULL, NULL);
	if (c < 0)
		fail("accept");
	/* At most 16 KiB a write: Linux (6.12.118 here) sends a larger one as a packet whose
	 * payload spans several descriptors (a nonlinear skb), which vhost-device-vsock 0.3.0
	 * (virtio-vsock 0.10) cannot take: it reads one data descriptor and drops the rest. */
	static unsigned char buf[16384];
	uint64_t total = 0;
	long long bad = -1;
	unsigned char want = 0, got = 0;
	for (;;) {
		ssize_t n = read(c, buf, sizeof buf);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail("read");
		if (n == 0)
			break;
		for (ssize_t i = 0; bad < 0 && i < n; i++)
			if (buf[i] != stream(total + i)) {
				bad = total + i;
				want = stream(total + i);
				got = buf[i];
				printf("@@ VSOCK received wrong byte at %lld (a read of %zd at %llu)\n",
				       bad, n, (unsigned long long)total);
				fflush(stdout);
			}
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(c, buf + off, n - off);
			if (w < 0 && errno == EINTR)
				continue;
			if (w < 0)
				fail("write");
			off += w;
		}
		total += n;
	}
	alarm(0);
	printf("@@ VALUE vsock_echoed %llu\n", (unsigned long long)total);
	if (bad < 0)
		printf("@@ VALUE vsock_received ok\n");
	else
		printf("@@ VALUE vsock_received differs at %lld: %02x, want %02x\n", bad, got, want);
	close(c);
	return 0;
}

/* A connection to the guest's PORT through the backend's Unix socket, or -1 if the backend
 * refused it (no listener yet). */
static int connect_once(const char *uds, unsigned port)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	strncpy(a.sun_path, uds, sizeof a.sun_path - 1);
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	if (s < 0)
		fail("socket(AF_UNIX)");
	if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
		close(s);
		return -1;
	}
	char line[32];
	int n = snprintf(line, sizeof line, "CONNECT %u\n", port);
	if (write(s, line, n) != n) {
		close(s);
		return -1;
	}
	/* "OK <host port>\n", a byte at a time: what follows is the guest's. */
	size_t got = 0;
	while (got < sizeof line - 1) {
		if (read(s, line + got, 1) != 1) {
			close(s);
			return -1;
		}
		if (line[got++] == '\n')
			break;
	}
	line[got] = 0;
	if (strncmp(line, "OK ", 3) != 0) {
		close(s);
		return -1;
	}
	return s;
}

static int call(const char *uds, unsigned port, uint64_t bytes)
{
	int s = -1;
	for (int tries = 0; s < 0 && tries < 100; tries++) {
		s = connect_once(uds, port);
		if (s < 0)
			sleep(1);
	}
	if (s < 0)
		fail("no connection through the backend");
	/* Writes never block: a full send buffer while the echo waits to be read would stall
	 * both ends. */
	fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
	static uint8_t out[65536], in[65536];
	uint64_t sent = 0, checked = 0;
	while (checked < bytes) {
		struct pollfd p = {.fd = s, .events = POLLIN | (sent < bytes ? POLLOUT : 0)};
		if (poll(&p, 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			fail("poll");
		}
		if ((p.revents & POLLOUT) && sent < bytes) {
			size_t n = bytes - sent < sizeof out ? bytes - sent : sizeof out;
			for (size_t i = 0; i < n; i++)
				out[i] = stream(sent + i);
			ssize_t w = write(s, out, n);
			if (w < 0 && errno != EAGAIN && errno != EINTR)
				fail("write");
			if (w > 0)
				sent += w;
		}
		if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t r = read(s, in, sizeof in);
			if (r < 0 && errno != EAGAIN && errno != EINTR)
				fail("read");
			if (r == 0) {
				printf("@@ VALUE vsock_echo short %llu of %llu\n",
				       (unsigned long long)checked, (unsigned long long)bytes);
				return 1;
			}
			for (ssize_t i = 0; i < r; i++)
				if (in[i] != stream(checked + i)) {
					printf("@@ VALUE vsock_echo differs at %llu: %02x, want %02x "
					       "(a read of %zd at %llu; %llu sent)\n",
					       (unsigned long long)(checked + i), in[i],
					       stream(checked + i), r, (unsigned long long)checked,
					       (unsigned long long)sent);
					return 1;
				}
			if (r > 0)
				checked += r;
		}
	}
	shutdown(s, SHUT_WR);
	printf("@@ VALUE vsock_echo ok %llu\n", (unsigned long long)bytes);
	close(s);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "listen") == 0)
		return listen_echo(strtoul(argv[2], NULL, 0));
	if (argc == 5 && strcmp(argv[1], "call") == 0)
		return call(argv[2], strtoul(argv[3], NULL, 0), strtoull(argv[4], NULL, 0));
	fprintf(stderr, "usage: vsockecho listen PORT | vsockecho call UDS PORT BYTES\n");
	return 2;
}
