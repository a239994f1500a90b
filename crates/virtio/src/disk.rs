//! What a virtio-blk device stores its sectors in: a raw file, or a qcow2 image through the
//! `imago` crate. Every method takes `&self` so that several requests can run at once on
//! separate threads.

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::RwLock;

pub const SECTOR: u64 = 512;
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

pub trait Disk: Send + Sync {
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Everything written so far is on stable storage when this returns.
    fn flush(&self) -> io::Result<()>;
    /// A hint: the range may be freed. Success even where nothing could be freed.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The range reads as zeros afterwards.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
#[error("disk image {path}: {why}")]
pub struct OpenError {
    pub path: String,
    pub why: String,
}

/// What to do about a disk image that would not open, by the reason it gave.
fn open_failure(e: &std::io::Error, read_only: bool) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => format!(
            "cannot open it: {e}; create it (for instance `truncate -s 1G IMAGE`, or `qemu-img \
             create -f qcow2 IMAGE 1G`) or point `image` at an existing file (a relative path \
             is taken from the description's directory)"
        ),
        ErrorKind::PermissionDenied if !read_only => format!(
            "cannot open it for writing: {e}; give this user write access to it, or set \
             read_only = true to serve it read-only"
        ),
        ErrorKind::PermissionDenied => {
            format!("cannot open it for reading: {e}; give this user read access to it")
        }
        _ => format!(
            "cannot open it{}: {e}",
            if read_only { "" } else { " for writing" }
        ),
    }
}

/// Opens `path` as `format`. Without a format, a name ending in `.qcow2` means qcow2 and
/// anything else raw; a raw-by-default file that starts like a qcow2 image is refused rather
/// than shown to the guest as its bytes (or, worse, trusted as qcow2 when the guest wrote the
/// header itself).
pub fn open(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
) -> Result<Box<dyn Disk>, OpenError> {
    let file = open_file(path, read_only)?;
    let (format, backing) = (format_of(path, format), Backing::Follow(path));
    from_file(
        file,
        &path.display().to_string(),
        format,
        read_only,
        backing,
    )
}

/// Opens the image file itself, for reading and, unless `read_only`, writing; the error says
/// what to do.
pub fn open_file(path: &Path, read_only: bool) -> Result<File, OpenError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| OpenError {
            path: path.display().to_string(),
            why: open_failure(&e, read_only),
        })
}

/// The format to open `path` as: the description's, or `Qcow2` by the name's `.qcow2`, or
/// None (raw unless the file starts like a qcow2 image).
pub fn format_of(path: &Path, format: Option<Format>) -> Option<Format> {
    format.or_else(|| {
        path.extension()
            .is_some_and(|e| e == "qcow2")
            .then_some(Format::Qcow2)
    })
}

/// What a qcow2 image's backing file may be.
#[derive(Clone, Copy, Debug)]
pub enum Backing<'a> {
    /// Opened by the name in its header, relative to this image's path.
    Follow(&'a Path),
    /// None may be opened (the jailed backend opens no path).
    Refuse,
}

/// Checks an image without reading its metadata: it opens (for writing unless `read_only`)
/// and its first bytes agree with `format`. For images a jailed backend will parse: splitvirt
/// must not parse metadata such a backend may have written.
pub fn check(path: &Path, format: Option<Format>, read_only: bool) -> Result<(), OpenError> {
    let file = open_file(path, read_only)?;
    let name = path.display().to_string();
    match settle(&file, &name, format_of(path, format))? {
        Format::Qcow2 => Ok(()),
        Format::Raw => Raw::new(file)
            .map(drop)
            .map_err(|why| OpenError { path: name, why }),
    }
}

/// The format to read `file` as, given the one asked for: None is raw unless the file starts
/// like a qcow2 image (then refused: the format must be said); qcow2 needs its magic.
fn settle(file: &File, name: &str, format: Option<Format>) -> Result<Format, OpenError> {
    let err = |why: &str| OpenError {
        path: name.to_owned(),
        why: why.to_owned(),
    };
    let mut magic = [0u8; 4];
    let has_magic = file.read_exact_at(&mut magic, 0).is_ok() && &magic == QCOW2_MAGIC;
    match (format, has_magic) {
        (None, true) => Err(err(
            "it starts with a qcow2 header but no format is given; set format = \"qcow2\" \
             (or format = \"raw\" if these are a guest's own bytes)",
        )),
        (Some(Format::Qcow2), false) => Err(err(
            "it is not a qcow2 image (no QFI\\xfb magic); set format = \"raw\" or convert it \
             with qemu-img convert -O qcow2",
        )),
        (Some(f), _) => Ok(f),
        (None, false) => Ok(Format::Raw),
    }
}

/// A disk over an open image file, `name` naming it in messages; `format` as [`settle`]
/// takes it.
pub fn from_file(
    file: File,
    name: &str,
    format: Option<Format>,
    read_only: bool,
    backing: Backing<'_>,
) -> Result<Box<dyn Disk>, OpenError> {
    let err = |why: String| OpenError {
        path: name.to_owned(),
        why,
    };
    match settle(&file, name, format)? {
        Format::Raw => Raw::new(file)
            .map(|d| Box::new(d) as Box<dyn Disk>)
            .map_err(err),
        Format::Qcow2 => Qcow2Disk::open(file, read_only, backing)
            .map(|d| Box::new(d) as Box<dyn Disk>)
            .map_err(|e| err(format!("cannot open it as qcow2: {e}"))),
    }
}

pub struct Raw {
    file: File,
    size: u64,
}

impl Raw {
    pub fn new(file: File) -> Result<Raw, String> {
        use std::io::Seek;
        use std::os::unix::fs::FileTypeExt;
        let meta = file.metadata().map_err(|e| e.to_string())?;
        // A block device (a device VM serving its own disk) has no length of its own.
        let size = if meta.file_type().is_block_device() {
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(|e| e.to_string())?
        } else {
            meta.len()
        };
        if size % SECTOR != 0 {
            return Err(format!(
                "its size {size} is not a multiple of 512 bytes; pad it (truncate -s)"
            ));
        }
        Ok(Raw { file, size })
    }
}

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

impl Disk for Raw {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on our own descriptor; a file system without holes just says no.
        let _ =
            unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off_t(offset)?, off_t(len)?) };
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: as above; on failure the zeros are written instead.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off_t(offset)?, off_t(len)?) } == 0
        {
            return Ok(());
        }
        write_zeros_by_hand(self, offset, len)
    }
}

fn write_zeros_by_hand(d: &dyn Disk, offset: u64, len: u64) -> io::Result<()> {
    let chunk = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        d.write_at(&chunk[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// qcow2 through imago. Reads, writes and zeroing share the image; discard changes mappings and
/// takes it alone (imago asks for `&mut` there).
pub struct Qcow2Disk {
    image: RwLock<FormatAccess<ImagoFile>>,
    size: u64,
}

impl Qcow2Disk {
    fn open(file: File, read_only: bool, backing: Backing<'_>) -> io::Result<Qcow2Disk> {
        let q = match backing {
            // Backing files named in the header are opened read-only by imago. The header is
            // the user's (the guest cannot write qcow2 metadata), so following it is what
            // they asked; imago takes them relative to the image's path, so it opens that.
            Backing::Follow(path) => {
                drop(file);
                Qcow2::<ImagoFile>::builder_path(path)
                    .write(!read_only)
                    .open(PermissiveImplicitOpenGate::default())?
            }
            Backing::Refuse => Qcow2::<ImagoFile>::builder(ImagoFile::try_from(file)?)
                .write(!read_only)
                .open(DenyImplicitOpenGate::default())
                .map_err(|e| {
                    io::Error::other(format!(
                        "{e}; the jailed backend opens no file by name, so a qcow2 image with a \
                         backing file cannot be served there yet: flatten it (`qemu-img convert \
                         -O qcow2 IMAGE FLAT.qcow2`), or serve the disk with placement = \
                         \"in-process\""
                    ))
                })?,
        };
        let access = FormatAccess::new(q);
        let size = access.size();
        if size % SECTOR != 0 {
            return Err(io::Error::other(format!(
                "its virtual size {size} is not a multiple of 512 bytes"
            )));
        }
        Ok(Qcow2Disk {
            image: RwLock::new(access),
            size,
        })
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, FormatAccess<ImagoFile>> {
        self.image.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl Disk for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.shared().read(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.shared().write(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        // Metadata caches out to the file, then the file to stable storage.
        let img = self.shared();
        img.flush()?;
        img.sync()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut img = self.image.write().unwrap_or_else(|e| e.into_inner());
        // Unaligned heads and tails stay allocated: a discard is only a hint.
        let _ = img.discard_to_any(offset, len);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.shared().write_zeroes(offset, len).is_ok() {
            return Ok(());
        }
        write_zeros_by_hand(self, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn raw_by_default_and_qcow2_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = raw_file(&dir, "a.img", &[7u8; 1024]);
        let d = open(&p, None, false).unwrap();
        assert_eq!(d.size(), 1024);
        let mut b = [0u8; 4];
        d.read_at(&mut b, 1000).unwrap();
        assert_eq!(b, [7; 4]);
        let q = raw_file(&dir, "b.qcow2", &[0u8; 1024]);
        let e = open(&q, None, false).err().unwrap().to_string();
        assert!(
            e.contains("not a qcow2 image") && e.contains("b.qcow2"),
            "{e}"
        );
    }

    #[test]
    fn a_raw_file_with_a_qcow2_header_needs_a_format() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0u8; 1024];
        bytes[..4].copy_from_slice(QCOW2_MAGIC);
        let p = raw_file(&dir, "guest-wrote-this.img", &bytes);
        let e = open(&p, None, true).err().unwrap().to_string();
        assert!(e.contains("format = \"qcow2\""), "{e}");
        assert_eq!(open(&p, Some(Format::Raw), true).unwrap().size(), 1024);
    }

    #[test]
    fn odd_sizes_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = raw_file(&dir, "odd.img", &[0u8; 1000]);
        let e = open(&p, None, true).err().unwrap().to_string();
        assert!(e.contains("1000") && e.contains("truncate"), "{e}");
    }

    #[test]
    fn a_missing_image_says_how_to_make_one_not_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let e = open(&dir.path().join("disk.img"), None, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("disk.img") && e.contains("No such file") && e.contains("truncate"),
            "{e}"
        );
        assert!(!e.contains("read_only"), "{e}");
    }
}
