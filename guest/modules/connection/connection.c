// SPDX-License-Identifier: GPL-2.0
/*
 * connection: the guest driver of splitvirt's cross-VM connector (PCI 1af4:a111), and of a
 * device VM's rpc-port (PCI 1af4:a112, at the end).
 *
 * One UIO device per connector, named from the device's name field: map 0 is BAR 0 (the event
 * page: write 0x0 to send an event, 0x4 counts received events), map 1 is BAR 1 (the dataport,
 * memory shared with the peer VM). mmap offset N * page size selects map N; a blocking read()
 * of /dev/uioN returns the number of interrupts so far. The interrupt is the connector's one
 * MSI-X vector where the platform has MSIs (the peer's VMM raises it through the hypervisor,
 * with no VMM thread in the way): then the handler keeps its own position in 0x4's count,
 * which it never writes (no exit per event), and acknowledges all when the driver goes, so
 * that no INTx level is left up. Else it is a level shared with other INTx devices, which the
 * handler claims only when 0x4 is non-zero, acknowledging the events it read by writing their
 * number back (an event that arrives in between stays counted, and keeps the level up).
 * sysfs `events` on the PCI device: every event received so far.
 *
 * Both drivers take their interrupt themselves (UIO_IRQ_CUSTOM) and tell UIO from the hard
 * interrupt handler: UIO's own handling defers that to an interrupt thread, a context switch
 * more per event before the reader wakes. The interrupt is requested after the UIO device and
 * so freed before it: no handler runs against a device that is gone.
 *
 * Both BARs are memory on the host and mapped cacheable, here and in userspace (writable
 * userspace mappings with their entries dirty from the start, connection_mmap): the event page
 * is a read-only memslot (reads of any kind at memory speed; writes trap to splitvirt, which
 * keeps the page up to date), the dataport plain shared memory. A non-cacheable mapping of
 * either would make string functions fault (unaligned device accesses) and, on hardware
 * without stage-2 forced write-back, could read stale bytes.
 */
#include <linux/io.h>
#include <linux/memremap.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/uio_driver.h>

#define CONN_EVENTS 0x4
#define CONN_NAME 0x8
#define CONN_NAME_LEN 50

struct connection {
	struct uio_info uio;
	u32 *events;
	/* Under `lock`: events taken so far and (MSI-X) where in 0x4's count that was. */
	spinlock_t lock;
	u64 received;
	u32 seen;
	bool msi;
	char name[CONN_NAME_LEN];
};

/*
 * mmap of map N (offset N pages, checked by UIO), as UIO maps UIO_MEM_PHYS and UIO_MEM_IOVA
 * memory, but with the entries of a writable mapping of memory (not registers) dirty from the
 * start. Nothing tracks these pages for writeback, and a CPU without hardware dirty-bit
 * management (no FEAT_HAFDBS: many arm64 cores, and the board's emulated one) otherwise takes a
 * permission fault on the first store to each page of every new mapping: 7 680 of them when a
 * program first fills 30 MiB of a dataport, which made that first pass 3x slower than memcpy
 * (docs/BENCHMARKS.md).
 */
static int connection_mmap(struct uio_info *info, struct vm_area_struct *vma)
{
	struct uio_mem *mem = info->mem + vma->vm_pgoff;
	pgprot_t prot = vma->vm_page_prot;

	if (mem->addr & ~PAGE_MASK)
		return -ENODEV;
	if (vma->vm_end - vma->vm_start > mem->size)
		return -EINVAL;
	if (mem->memtype == UIO_MEM_PHYS)
		prot = pgprot_noncached(prot);
	else if (vma->vm_flags & VM_WRITE)
		prot = pte_pgprot(pte_mkyoung(pte_mkdirty(pfn_pte(0, prot))));
	vma->vm_page_prot = prot;
	return remap_pfn_range(vma, vma->vm_start, mem->addr >> PAGE_SHIFT,
			       vma->vm_end - vma->vm_start, prot);
}

static irqreturn_t connection_irq(int irq, void *data)
{
	struct connection *c = data;
	irqreturn_t ret = IRQ_HANDLED;
	u32 n;

	spin_lock(&c->lock);
	n = READ_ONCE(*c->events);
	if (c->msi) {
		/* The count runs on (modulo 2^32); what is new is past our position. */
		c->received += (u32)(n - c->seen);
		c->seen = n;
	} else if (n) {
		/* A store to the read-only page: it traps, and splitvirt acknowledges n. */
		WRITE_ONCE(*c->events, n);
		c->received += n;
	} else {
		ret = IRQ_NONE;
	}
	spin_unlock(&c->lock);
	if (ret == IRQ_HANDLED)
		uio_event_notify(&c->uio);
	return ret;
}

static ssize_t events_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct connection *c = pci_get_drvdata(to_pci_dev(dev));
	unsigned long flags;
	u64 total;
	u32 n;

	spin_lock_irqsave(&c->lock, flags);
	n = READ_ONCE(*c->events);
	total = c->received + (c->msi ? (u32)(n - c->seen) : n);
	spin_unlock_irqrestore(&c->lock, flags);
	return sysfs_emit(buf, "%llu\n", (unsigned long long)total);
}
static DEVICE_ATTR_RO(events);

static struct attribute *connection_attrs[] = {
	&dev_attr_events.attr,
	NULL,
};
ATTRIBUTE_GROUPS(connection);

static void connection_ack_all(void *data)
{
	struct connection *c = data;

	WRITE_ONCE(*c->events, 0);
}

static int connection_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct connection *c;
	void *page;
	int err;

	c = devm_kzalloc(&pdev->dev, sizeof(*c), GFP_KERNEL);
	if (!c)
		return -ENOMEM;
	err = pcim_enable_device(pdev);
	if (err)
		return err;
	err = pcim_request_all_regions(pdev, "connection");
	if (err)
		return err;
	page = devm_memremap(&pdev->dev, pci_resource_start(pdev, 0), pci_resource_len(pdev, 0),
			     MEMREMAP_WB);
	if (IS_ERR(page))
		return PTR_ERR(page);
	c->events = page + CONN_EVENTS;
	memcpy(c->name, page + CONN_NAME, CONN_NAME_LEN);
	c->name[CONN_NAME_LEN - 1] = 0;

	c->uio.name = c->name;
	c->uio.version = "1";
	c->uio.priv = c;
	c->uio.mem[0].name = "event";
	c->uio.mem[0].addr = pci_resource_start(pdev, 0);
	c->uio.mem[0].size = pci_resource_len(pdev, 0);
	/* UIO_MEM_IOVA takes the physical path without the uncached attribute UIO_MEM_PHYS
	 * forces. */
	c->uio.mem[0].memtype = UIO_MEM_IOVA;
	c->uio.mem[1].name = "dataport";
	c->uio.mem[1].addr = pci_resource_start(pdev, 1);
	c->uio.mem[1].size = pci_resource_len(pdev, 1);
	c->uio.mem[1].memtype = UIO_MEM_IOVA;
	pci_set_master(pdev);
	err = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSIX | PCI_IRQ_INTX);
	if (err < 0)
		return err;
	c->msi = pdev->msix_enabled;
	spin_lock_init(&c->lock);
	c->seen = READ_ONCE(*c->events);
	/* Released before the vectors are (devres runs backwards): leave nothing counted. */
	err = devm_add_action_or_reset(&pdev->dev, connection_ack_all, c);
	if (err)
		return err;
	c->uio.irq = UIO_IRQ_CUSTOM;
	c->uio.mmap = connection_mmap;

	pci_set_drvdata(pdev, c);
	err = devm_uio_register_device(&pdev->dev, &c->uio);
	if (err)
		return err;
	err = devm_request_irq(&pdev->dev, pci_irq_vector(pdev, 0), connection_irq,
			       c->msi ? 0 : IRQF_SHARED, c->name, c);
	if (err)
		return err;
	dev_info(&pdev->dev, "connection \"%s\": dataport %pa bytes, events by %s\n", c->name,
		 &c->uio.mem[1].size, c->msi ? "MSI-X" : "INTx");
	return 0;
}

static const struct pci_device_id connection_ids[] = {
	{ PCI_DEVICE(0x1af4, 0xa111) },
	{}
};
MODULE_DEVICE_TABLE(pci, connection_ids);

static struct pci_driver connection_driver = {
	.name = "connection",
	.id_table = connection_ids,
	.probe = connection_probe,
	.dev_groups = connection_groups,
};

/*
 * A device VM's rpc-port (PCI 1af4:a112): one UIO device named "rpc-port" per port. Map 0 is
 * BAR 0, the registers (device memory: every access is the VMM's, doorbell stores caught by
 * KVM), map 1 BAR 2 (the driver VM's control region) and map 2 BAR 4 (its pool), both memory
 * the VMM maps in, cacheable. The interrupt is the port's one MSI-X vector (there is no INTx),
 * which KVM raises for any doorbell of the driver VM; read() counts them.
 */
static irqreturn_t port_irq(int irq, void *data)
{
	uio_event_notify(data);
	return IRQ_HANDLED;
}

static int port_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct uio_info *uio;
	int err;

	uio = devm_kzalloc(&pdev->dev, sizeof(*uio), GFP_KERNEL);
	if (!uio)
		return -ENOMEM;
	err = pcim_enable_device(pdev);
	if (err)
		return err;
	err = pcim_request_all_regions(pdev, "rpc-port");
	if (err)
		return err;
	uio->name = "rpc-port";
	uio->version = "1";
	uio->mem[0].name = "registers";
	uio->mem[0].addr = pci_resource_start(pdev, 0);
	uio->mem[0].size = pci_resource_len(pdev, 0);
	uio->mem[0].memtype = UIO_MEM_PHYS;
	uio->mem[1].name = "control";
	uio->mem[1].addr = pci_resource_start(pdev, 2);
	uio->mem[1].size = pci_resource_len(pdev, 2);
	uio->mem[1].memtype = UIO_MEM_IOVA;
	uio->mem[2].name = "pool";
	uio->mem[2].addr = pci_resource_start(pdev, 4);
	uio->mem[2].size = pci_resource_len(pdev, 4);
	uio->mem[2].memtype = UIO_MEM_IOVA;
	pci_set_master(pdev);
	err = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSIX);
	if (err < 0)
		return err;
	uio->irq = UIO_IRQ_CUSTOM;
	uio->mmap = connection_mmap;
	err = devm_uio_register_device(&pdev->dev, uio);
	if (err)
		return err;
	err = devm_request_irq(&pdev->dev, pci_irq_vector(pdev, 0), port_irq, 0, "rpc-port", uio);
	if (err)
		return err;
	dev_info(&pdev->dev, "rpc-port: pool BAR %pa bytes\n", &uio->mem[2].size);
	return 0;
}

static const struct pci_device_id port_ids[] = {
	{ PCI_DEVICE(0x1af4, 0xa112) },
	{}
};
MODULE_DEVICE_TABLE(pci, port_ids);

static struct pci_driver port_driver = {
	.name = "rpc-port",
	.id_table = port_ids,
	.probe = port_probe,
};

static int __init connection_init(void)
{
	int err = pci_register_driver(&connection_driver);

	if (err)
		return err;
	err = pci_register_driver(&port_driver);
	if (err)
		pci_unregister_driver(&connection_driver);
	return err;
}

static void __exit connection_exit(void)
{
	pci_unregister_driver(&port_driver);
	pci_unregister_driver(&connection_driver);
}
module_init(connection_init);
module_exit(connection_exit);

MODULE_DESCRIPTION("splitvirt cross-VM connector (UIO)");
MODULE_LICENSE("GPL");
