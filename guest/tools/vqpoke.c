/* A hostile driver, static aarch64, for the vhost-user test (`cargo xtask kvmvhost`): takes a
 * virtio-pci device that no driver holds, negotiates VERSION_1 and ACCESS_PLATFORM, places
 * queue 0's rings at ADDR (anywhere: outside the restricted pool is the point), sets
 * DRIVER_OK and prints the device status the device answers with:
 *
 *   vqpoke /sys/bus/pci/devices/0000:00:02.0 0x40000000
 *   @@ VALUE vq_status 0x4f
 *
 * The common configuration is found through the device's virtio capabilities and reached
 * through sysfs's mapping of its BAR, with 32-, 16- and 8-bit accesses only.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ACKNOWLEDGE 1
#define DRIVER 2
#define DRIVER_OK 4
#define FEATURES_OK 8

static volatile uint8_t *common;

static void w32(unsigned off, uint32_t v) { *(volatile uint32_t *)(common + off) = v; }
static void w16(unsigned off, uint16_t v) { *(volatile uint16_t *)(common + off) = v; }
static void w8(unsigned off, uint8_t v) { *(volatile uint8_t *)(common + off) = v; }
static uint8_t r8(unsigned off) { return *(volatile uint8_t *)(common + off); }

static void die(const char *what)
{
	printf("@@ RESULT vqpoke FAIL %s\n", what);
	exit(1);
}

int main(int argc, char **argv)
{
	if (argc != 3)
		die("usage: vqpoke DEVICE-SYSFS-DIR ADDR");
	uint64_t addr = strtoull(argv[2], NULL, 0);
	char path[512];
	unsigned char cfg[256];
	snprintf(path, sizeof(path), "%s/config", argv[1]);
	int fd = open(path, O_RDONLY);
	if (fd < 0 || read(fd, cfg, sizeof(cfg)) != (ssize_t)sizeof(cfg))
		die("cannot read the config space");
	close(fd);
	/* The capability list: a vendor capability (0x09) of cfg_type 1 is the common config. */
	int bar = -1;
	uint32_t offset = 0;
	for (unsigned at = cfg[0x34] & 0xfc, n = 0; at && at < 0xfc && n < 48; at = cfg[at + 1] & 0xfc, n++) {
		if (cfg[at] == 0x09 && cfg[at + 3] == 1) {
			bar = cfg[at + 4];
			memcpy(&offset, &cfg[at + 8], 4);
			break;
		}
	}
	if (bar < 0 || bar > 5)
		die("no common configuration capability");
	snprintf(path, sizeof(path), "%s/resource%d", argv[1], bar);
	fd = open(path, O_RDWR | O_SYNC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0 || st.st_size < (off_t)offset + 0x38)
		die("cannot open the BAR");
	void *map = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED)
		die("cannot map the BAR");
	common = (volatile uint8_t *)map + offset;

	w8(0x14, 0); /* reset */
	for (int i = 0; i < 1000000 && r8(0x14) != 0; i++)
		;
	w8(0x14, ACKNOWLEDGE | DRIVER);
	w32(0x08, 0);
	w32(0x0c, 0);
	w32(0x08, 1);
	w32(0x0c, 3); /* VERSION_1 and ACCESS_PLATFORM */
	w8(0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK);
	if (!(r8(0x14) & FEATURES_OK))
		die("the device refused the features");
	w16(0x16, 0);  /* queue_select */
	w16(0x18, 16); /* queue_size */
	w32(0x20, (uint32_t)addr);
	w32(0x24, (uint32_t)(addr >> 32));
	w32(0x28, (uint32_t)(addr + 0x1000));
	w32(0x2c, (uint32_t)((addr + 0x1000) >> 32));
	w32(0x30, (uint32_t)(addr + 0x2000));
	w32(0x34, (uint32_t)((addr + 0x2000) >> 32));
	w16(0x1c, 1); /* queue_enable */
	w8(0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
	printf("@@ VALUE vq_status 0x%02x\n", r8(0x14));
	return 0;
}
