//! The arm64 Linux boot protocol (Documentation/arch/arm64/booting.rst): the Image header, and
//! where kernel, DTB and initrd go in RAM. linux-loader does the same for its own memory types;
//! ours is checked against the layout (pool included) and needs no guest memory to test.

use layout::Region;
use std::io::Read;

pub const MIB: u64 = 1 << 20;
const MAGIC: u32 = 0x644d_5241; // "ARM\x64"
const HEADER_LEN: usize = 64;
/// booting.rst: image_size 0 means a kernel older than 3.17 with text_offset 0x80000.
const OLD_TEXT_OFFSET: u64 = 0x8_0000;
/// The DTB must not exceed 2 MiB and is mapped in 2 MiB blocks.
pub const DTB_MAX: u64 = 2 * MIB;
/// A decompressed Image larger than this is not a kernel we want to inflate into memory.
const MAX_IMAGE: u64 = 512 * MIB;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "{what} is {len} bytes, too small for an arm64 Image header (64 bytes): is it a kernel?"
    )]
    TooSmall { what: String, len: usize },
    #[error("{what} is not an arm64 Linux Image: magic at 0x38 is {found:#010x}, expected 0x644d5241 (\"ARM\\x64\"); pass arch/arm64/boot/Image or Image.gz, not vmlinux or a zImage")]
    BadMagic { what: String, found: u32 },
    #[error("{what} is a big-endian kernel (header flags bit 0); splitvirt boots little-endian guests only")]
    BigEndian { what: String },
    #[error("{what} is gzip-compressed but does not inflate: {source} (truncated download?)")]
    Gzip {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} inflates to more than {} MiB: not a kernel Image", MAX_IMAGE >> 20)]
    Inflated { what: String },
    #[error("{what}: the file is {len} bytes but its header says the image is {image_size} bytes: truncated?")]
    Truncated {
        what: String,
        len: u64,
        image_size: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    Unspecified,
    K4,
    K16,
    K64,
}

/// What an Image's header says about it (its bytes are the caller's: a file it reads straight
/// into guest memory, or what [`Kernel::parse`] inflated).
#[derive(Clone, Debug)]
pub struct Kernel {
    pub text_offset: u64,
    /// Bytes the kernel occupies from its load address, BSS included.
    pub image_size: u64,
    pub page_size: PageSize,
    pub was_gzip: bool,
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl Kernel {
    /// Whether a file starting with `head` is gzip-compressed (an Image.gz).
    pub fn is_gzip(head: &[u8]) -> bool {
        head.starts_with(&[0x1f, 0x8b])
    }

    /// Parses a raw or gzip-compressed arm64 Image held in memory: what it is, and the
    /// Image's bytes (inflated, if it was compressed). `what` names it in errors.
    pub fn parse(file: &[u8], what: &str) -> Result<(Kernel, Vec<u8>), ImageError> {
        if !Self::is_gzip(file) {
            return Ok((
                Self::from_header(file, file.len() as u64, what)?,
                file.to_vec(),
            ));
        }
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(file)
            .take(MAX_IMAGE + 1)
            .read_to_end(&mut out)
            .map_err(|source| ImageError::Gzip {
                what: what.into(),
                source,
            })?;
        if out.len() as u64 > MAX_IMAGE {
            return Err(ImageError::Inflated { what: what.into() });
        }
        let mut k = Self::from_header(&out, out.len() as u64, what)?;
        k.was_gzip = true;
        Ok((k, out))
    }

    /// Checks a raw Image by its header: `head` is its start (64 bytes or more), `len` the
    /// whole file's size. Nothing else of the file needs reading.
    pub fn from_header(head: &[u8], len: u64, what: &str) -> Result<Kernel, ImageError> {
        if head.len() < HEADER_LEN {
            return Err(ImageError::TooSmall {
                what: what.into(),
                len: head.len(),
            });
        }
        let magic = u32::from_le_bytes(head[0x38..0x3c].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err(ImageError::BadMagic {
                what: what.into(),
                found: magic,
            });
        }
        let (mut text_offset, image_size, flags) = (le64(head, 8), le64(head, 16), le64(head, 24));
        let image_size = if image_size == 0 {
            text_offset = OLD_TEXT_OFFSET;
            // Old kernels do not say how much BSS follows: leave as much again.
            len.saturating_mul(2)
        } else {
            if flags & 1 == 1 {
                return Err(ImageError::BigEndian { what: what.into() });
            }
            image_size
        };
        let page_size = match (flags >> 1) & 3 {
            1 => PageSize::K4,
            2 => PageSize::K16,
            3 => PageSize::K64,
            _ => PageSize::Unspecified,
        };
        // The loaded part must be all there: a file shorter than its text is truncated. The
        // text ends where BSS starts, which the header does not say; PE kernels say it in the
        // PE header. A file shorter than 1/4 of image_size cannot be whole.
        if len < image_size / 4 {
            return Err(ImageError::Truncated {
                what: what.into(),
                len,
                image_size,
            });
        }
        Ok(Kernel {
            text_offset,
            image_size: image_size.max(len),
            page_size,
            was_gzip: false,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlaceError {
    #[error("the kernel ({kernel}) does not fit in {ram}; give the VM more memory")]
    KernelTooBig { kernel: Region, ram: Region },
    #[error("the kernel ({kernel}) overlaps the {pool}; move the pool above the kernel")]
    KernelOverPool { kernel: Region, pool: Region },
    #[error("the device tree is {size} bytes; the boot protocol allows at most 2 MiB")]
    DtbTooBig { size: u64 },
    #[error("no room for the {what} ({size} bytes) in RAM outside the kernel and the pool; give the VM more memory")]
    NoRoom { what: &'static str, size: u64 },
}

/// Where everything goes. All addresses are guest physical.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub kernel: u64,
    pub kernel_end: u64,
    pub dtb: u64,
    pub initrd: Option<(u64, u64)>,
}

/// Places the kernel at the first 2 MiB boundary of RAM plus text_offset, then the DTB (in a
/// 2 MiB block of its own) and the initrd as high as they fit, never on the kernel or the pool.
pub fn place(
    ram: &Region,
    pool: Option<&Region>,
    text_offset: u64,
    image_size: u64,
    dtb_size: u64,
    initrd_size: Option<u64>,
) -> Result<Placement, PlaceError> {
    let base = ram.base.next_multiple_of(2 * MIB);
    let kernel = Region::new("kernel", base.saturating_add(text_offset), image_size);
    if kernel
        .end()
        .is_none_or(|e| e > ram.base.saturating_add(ram.size))
    {
        return Err(PlaceError::KernelTooBig {
            kernel,
            ram: ram.clone(),
        });
    }
    if let Some(p) = pool.filter(|p| p.overlaps(&kernel)) {
        return Err(PlaceError::KernelOverPool {
            kernel,
            pool: p.clone(),
        });
    }
    if dtb_size > DTB_MAX {
        return Err(PlaceError::DtbTooBig { size: dtb_size });
    }
    let mut taken = vec![Region::new(
        "",
        base,
        text_offset.saturating_add(image_size),
    )];
    taken.extend(pool.cloned());
    let dtb = top_fit(ram, &taken, DTB_MAX, 2 * MIB).ok_or(PlaceError::NoRoom {
        what: "device tree",
        size: dtb_size,
    })?;
    taken.push(Region::new("", dtb, DTB_MAX));
    let initrd = match initrd_size {
        None => None,
        Some(size) => {
            let at = top_fit(ram, &taken, size, 4096).ok_or(PlaceError::NoRoom {
                what: "initrd",
                size,
            })?;
            Some((at, at + size))
        }
    };
    Ok(Placement {
        kernel: kernel.base,
        kernel_end: kernel.base + image_size,
        dtb,
        initrd,
    })
}

/// The highest `align`-aligned start of `size` bytes inside `ram` clear of every `taken`.
fn top_fit(ram: &Region, taken: &[Region], size: u64, align: u64) -> Option<u64> {
    let end = ram.base.checked_add(ram.size)?;
    let mut top = end.checked_sub(size)? / align * align;
    // Each step moves below one taken region for good: at most taken.len() + 1 steps.
    for _ in 0..=taken.len() {
        if top < ram.base {
            return None;
        }
        let cand = Region::new("", top, size);
        match taken
            .iter()
            .filter(|t| t.overlaps(&cand))
            .map(|t| t.base)
            .min()
        {
            None => return Some(top),
            Some(b) => top = b.checked_sub(size)? / align * align,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub fn header(text_offset: u64, image_size: u64, flags: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len.max(64)];
        b[8..16].copy_from_slice(&text_offset.to_le_bytes());
        b[16..24].copy_from_slice(&image_size.to_le_bytes());
        b[24..32].copy_from_slice(&flags.to_le_bytes());
        b[0x38..0x3c].copy_from_slice(b"ARM\x64");
        b
    }

    #[test]
    fn parses_a_modern_header() {
        let (k, _) = Kernel::parse(&header(0, 8 << 20, 0b1010, 4 << 20), "Image").unwrap();
        assert_eq!(
            (k.text_offset, k.image_size, k.page_size, k.was_gzip),
            (0, 8 << 20, PageSize::K4, false)
        );
    }

    #[test]
    fn old_kernels_get_the_old_text_offset() {
        let (k, _) = Kernel::parse(&header(0, 0, 0, 1 << 20), "old").unwrap();
        assert_eq!(k.text_offset, 0x80000);
        assert!(k.image_size >= 1 << 20);
    }

    #[test]
    fn gzip_images_inflate_and_truncated_ones_fail() {
        let raw = header(0, 2 << 20, 2, 1 << 20);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let gz = gz.finish().unwrap();
        let (k, bytes) = Kernel::parse(&gz, "Image.gz").unwrap();
        assert!(k.was_gzip && bytes == raw);
        let e = Kernel::parse(&gz[..gz.len() / 2], "Image.gz").unwrap_err();
        assert!(matches!(e, ImageError::Gzip { .. }), "{e}");
    }

    /// A raw Image is checked from its first 64 bytes and the file's size: the same answers as
    /// from the whole file.
    #[test]
    fn a_header_and_a_size_say_what_the_whole_file_says() {
        let whole = header(0, 8 << 20, 0b1010, 4 << 20);
        let k = Kernel::from_header(&whole[..64], whole.len() as u64, "Image").unwrap();
        assert_eq!((k.text_offset, k.image_size), (0, 8 << 20));
        let e = Kernel::from_header(&whole[..64], 4096, "cut").unwrap_err();
        assert!(matches!(e, ImageError::Truncated { len: 4096, .. }), "{e}");
        let e = Kernel::from_header(&whole[..40], 40, "short").unwrap_err();
        assert!(matches!(e, ImageError::TooSmall { len: 40, .. }), "{e}");
    }

    #[test]
    fn bad_images_are_named() {
        let e = Kernel::parse(b"\x7fELF not a kernel", "vmlinux").unwrap_err();
        assert!(matches!(e, ImageError::TooSmall { .. }));
        let mut elf = vec![0u8; 4096];
        elf[..4].copy_from_slice(b"\x7fELF");
        let e = Kernel::parse(&elf, "vmlinux").unwrap_err();
        assert!(
            e.to_string()
                .contains("vmlinux is not an arm64 Linux Image"),
            "{e}"
        );
        let e = Kernel::parse(&header(0, 2 << 20, 1, 1 << 20), "be").unwrap_err();
        assert!(matches!(e, ImageError::BigEndian { .. }));
        let e = Kernel::parse(&header(0, 64 << 20, 2, 4096), "cut").unwrap_err();
        assert!(matches!(e, ImageError::Truncated { .. }), "{e}");
    }

    fn ram() -> Region {
        Region::new("RAM", 0x4000_0000, 512 * MIB)
    }
    fn pool() -> Region {
        Region::new("pool", 0x5000_0000, 64 * MIB)
    }

    #[test]
    fn places_kernel_low_and_the_rest_high() {
        let p = place(&ram(), Some(&pool()), 0, 20 * MIB, 4096, Some(10 * MIB)).unwrap();
        assert_eq!(p.kernel, 0x4000_0000);
        assert_eq!(p.dtb, 0x5fe0_0000);
        let (s, e) = p.initrd.unwrap();
        assert_eq!(e, 0x5fe0_0000);
        assert_eq!(s % 4096, 0);
    }

    #[test]
    fn the_pool_at_the_top_pushes_dtb_and_initrd_below_it() {
        let high = Region::new("pool", 0x5c00_0000, 64 * MIB);
        let p = place(&ram(), Some(&high), 0, 20 * MIB, 4096, Some(10 * MIB)).unwrap();
        assert!(p.dtb + DTB_MAX <= high.base);
        assert!(p.initrd.unwrap().1 <= p.dtb);
    }

    #[test]
    fn placement_errors() {
        assert!(matches!(
            place(&ram(), None, 0, 600 * MIB, 1, None),
            Err(PlaceError::KernelTooBig { .. })
        ));
        let low = Region::new("pool", 0x4010_0000, 16 * MIB);
        assert!(matches!(
            place(&ram(), Some(&low), 0, 20 * MIB, 1, None),
            Err(PlaceError::KernelOverPool { .. })
        ));
        assert!(matches!(
            place(&ram(), None, 0, MIB, 3 * MIB, None),
            Err(PlaceError::DtbTooBig { .. })
        ));
        assert!(matches!(
            place(&ram(), Some(&pool()), 0, 20 * MIB, 1, Some(500 * MIB)),
            Err(PlaceError::NoRoom { what: "initrd", .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn placements_never_overlap(kmib in 1u64..100, imib in 0u64..200, pool_at in 0u64..448, pool_mib in 1u64..64) {
            let pool = Region::new("pool", 0x4000_0000 + pool_at * MIB, pool_mib * MIB);
            let r = place(&ram(), Some(&pool), 0, kmib * MIB, 4096, (imib > 0).then_some(imib * MIB));
            if let Ok(p) = r {
                let k = Region::new("k", p.kernel, kmib * MIB);
                let d = Region::new("d", p.dtb, DTB_MAX);
                proptest::prop_assert!(!k.overlaps(&d) && !d.overlaps(&pool) && ram().contains(&d) && ram().contains(&k));
                if let Some((s, e)) = p.initrd {
                    let i = Region::new("i", s, e - s);
                    proptest::prop_assert!(!i.overlaps(&k) && !i.overlaps(&d) && !i.overlaps(&pool) && ram().contains(&i));
                }
            }
        }
    }
}
