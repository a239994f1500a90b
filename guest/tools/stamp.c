/* The board's stopwatch for `cargo xtask bench qemu` (static aarch64):
 *   stamp MARKER CMD [ARGS...]
 * runs CMD with its stdout and stderr on one pipe, copies what it prints to stdout, and at its
 * end prints, on the board's own clock, whatever the VMM:
 *   @@ VALUE marker_ms N     exec to the first line holding MARKER
 *   @@ VALUE exit_ms N       exec to CMD's end
 *   @@ VALUE vmm_rss_kib N   CMD's resident memory when MARKER was seen, less every mapping of
 *                            32 MiB or more (guest RAM: QEMU's one block; splitvirt's RAM and pool)
 * The same measure for both VMMs, taken from outside either. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double ms_since(const struct timespec *t0)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (t.tv_sec - t0->tv_sec) * 1e3 + (t.tv_nsec - t0->tv_nsec) / 1e6;
}

/* Resident KiB of pid outside mappings of 32 MiB or more; -1 when smaps cannot be read. */
static long rss_outside_guest_ram(pid_t pid)
{
	char path[64], line[512];
	snprintf(path, sizeof path, "/proc/%d/smaps", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	long total = 0, kib;
	int big = 0;
	unsigned long lo, hi;
	while (fgets(line, sizeof line, f)) {
		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' '))
			big = hi - lo >= (32ul << 20);
		else if (sscanf(line, "Rss: %ld kB", &kib) == 1 && !big)
			total += kib;
	}
	fclose(f);
	return total;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: stamp MARKER CMD [ARGS...]\n");
		return 2;
	}
	int p[2];
	if (pipe(p)) {
		perror("pipe");
		return 1;
	}
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		return 1;
	}
	if (pid == 0) {
		dup2(p[1], 1);
		dup2(p[1], 2);
		close(p[0]);
		close(p[1]);
		execvp(argv[2], argv + 2);
		perror(argv[2]);
		_exit(127);
	}
	close(p[1]);
	FILE *in = fdopen(p[0], "r");
	char line[4096];
	double marker = -1;
	long rss = -1;
	while (fgets(line, sizeof line, in)) {
		fputs(line, stdout);
		if (marker < 0 && strstr(line, argv[1])) {
			marker = ms_since(&t0);
			rss = rss_outside_guest_ram(pid);
		}
	}
	int st = 0;
	waitpid(pid, &st, 0);
	double end = ms_since(&t0);
	if (marker >= 0)
		printf("@@ VALUE marker_ms %.0f\n", marker);
	printf("@@ VALUE exit_ms %.0f\n", end);
	if (rss >= 0)
		printf("@@ VALUE vmm_rss_kib %ld\n", rss);
	printf("@@ VALUE exit_status %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
	return 0;
}
