//! HDF5 files are read through our own read-only file driver (`pipeline/csrc/h5guard.c`: pread, as HDF5's
//! POSIX driver) so that a damaged global heap collection is refused before HDF5 decodes it. HDF5 2.0.0 (as
//! hdf5-metno-src 0.10.4 bundles it) decodes a collection by walking its objects, each step advancing by the
//! object's stored size; a free-space object (index 0) of size 0 advances by 0 bytes, and the walk loops forever
//! inside HDF5's global lock, hanging every thread that touches HDF5. Collections hold variable-length data: the
//! `class_names` and `checksum` attributes, the encoded layout's files. [`gheap_check`] repeats HDF5's walk and
//! refuses that case, and an object past the collection's end (HDF5 refuses it too, unless its pointer arithmetic
//! wraps around).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, CStr, CString};
use std::path::Path;
use std::sync::Mutex;

use ::hdf5::File;

type Hid = i64;

extern "C" {
    fn selfsup_h5guard_open(path: *const c_char) -> Hid;
}

/// Why the driver refused a read of each file (by path), kept until [`take_refusal`] reports it.
static REFUSED: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

/// Opens `path` read-only through the guarding driver.
pub(super) fn open(path: &Path) -> ::hdf5::Result<File> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| ::hdf5::Error::from("the path holds a NUL byte"))?;
    ::hdf5::sync::sync(|| {
        // SAFETY: HDF5's lock is held (sync); the path is a NUL-terminated string that outlives the call; a
        // non-negative id is a file id we own, handed to `from_id`, which closes it on drop.
        let id = ::hdf5::h5check(unsafe { selfsup_h5guard_open(c.as_ptr()) })?;
        unsafe { ::hdf5::from_id::<File>(id) }
    })
}

/// Why the driver refused a read of `path`, if it did since the last call (consumed).
pub(super) fn take_refusal(path: &Path) -> Option<String> {
    let key = path.to_string_lossy();
    REFUSED.lock().unwrap_or_else(|e| e.into_inner()).as_mut()?.remove(key.as_ref())
}

/// Called by the driver for every global heap read: 0 when HDF5 may decode `buf[..len]` (read at `addr` from
/// `path`; lengths in the file take `sizeof_size` bytes), else 1 after recording why.
///
/// # Safety
/// `path` is a NUL-terminated string and `buf` is valid for `len` bytes (the driver's read buffer).
#[no_mangle]
pub unsafe extern "C" fn selfsup_gheap_check(
    path: *const c_char,
    buf: *const u8,
    len: usize,
    sizeof_size: c_uint,
    addr: u64,
) -> c_int {
    // SAFETY: as the caller promises.
    let bytes = unsafe { std::slice::from_raw_parts(buf, len) };
    let Err(why) = gheap_check(bytes, sizeof_size as usize) else { return 0 };
    let path = unsafe { CStr::from_ptr(path) }.to_string_lossy().into_owned();
    let message = format!("damaged global heap collection at byte {addr}: {why} (corrupt file)");
    REFUSED.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).insert(path, message);
    1
}

/// HDF5's smallest collection, and the length of its first read of one.
const MIN_COLLECTION: u64 = 4096;

/// HDF5's `H5HG_ALIGN` in its `size_t` arithmetic (wrapping: a size near 2^64 aligns to a small number, and
/// HDF5's walk goes on from there).
fn align8(x: u64) -> u64 {
    x.wrapping_add(7) / 8 * 8
}

fn le(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0u64, |v, &b| (v << 8) | u64::from(b))
}

/// HDF5's walk over the objects of the global heap collection that `image` holds (all of it), in HDF5's own
/// arithmetic: `Err` naming the object where the walk would stop advancing (size 0) or leave the collection
/// (which HDF5 reports, unless its pointer arithmetic wraps). Anything that is not a whole collection (another
/// read, a wrong version, a size below HDF5's minimum, which HDF5 refuses itself) is `Ok`: HDF5 decides.
pub(crate) fn gheap_check(image: &[u8], sizeof_size: usize) -> Result<(), String> {
    let l = sizeof_size;
    if !(1..=8).contains(&l) || image.len() < 8 + l || &image[..4] != b"GCOL" || image[4] != 1 {
        return Ok(());
    }
    let size = le(&image[8..8 + l]);
    // HDF5 reads a collection's first 4096 bytes (refusing a collection smaller than that), then the rest once
    // the header gave its size; the driver hands over the whole collection at the first read. Reads of other
    // lengths are raw data that happens to start with the signature.
    let len = image.len() as u64;
    if size < MIN_COLLECTION || size > len || (len != MIN_COLLECTION && len != size) {
        return Ok(());
    }
    let header = align8(8 + l as u64);
    let object_header = header;
    let mut p = header;
    while p < size {
        if p + object_header > size {
            // The tail too small for an object header: free space, the end of the walk.
            break;
        }
        let at = p as usize;
        let index = u16::from_le_bytes([image[at], image[at + 1]]);
        let object_size = le(&image[at + 8..at + 8 + l]);
        let need = if index > 0 { object_header.wrapping_add(align8(object_size)) } else { object_size };
        if need == 0 {
            return Err(format!("its object at offset {p} (index 0, free space) has size 0, which HDF5 loops on"));
        }
        // HDF5 refuses an object past the end, unless the pointer arithmetic wraps around: refused here either way.
        if need > size - p {
            return Err(format!(
                "its object at offset {p} (index {index}) claims {object_size} bytes, past the collection's {size}"
            ));
        }
        p += need;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::gheap_check;

    /// A collection of `size` bytes holding `objects` (index, data) and free space after them, as HDF5 writes it
    /// with 8-byte lengths.
    fn collection(size: usize, objects: &[(u16, &[u8])]) -> Vec<u8> {
        let mut c = b"GCOL\x01\0\0\0".to_vec();
        c.extend_from_slice(&(size as u64).to_le_bytes());
        for (index, data) in objects {
            c.extend_from_slice(&index.to_le_bytes());
            c.extend_from_slice(&[1, 0, 0, 0, 0, 0]);
            c.extend_from_slice(&(data.len() as u64).to_le_bytes());
            c.extend_from_slice(data);
            c.resize(c.len().div_ceil(8) * 8, 0);
        }
        let free = size - c.len();
        c.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        c.extend_from_slice(&(free as u64).to_le_bytes());
        c.resize(size, 0);
        c
    }

    /// `c` with its first object's index and size zeroed.
    fn bad_free(c: &[u8]) -> Vec<u8> {
        let mut bad = c.to_vec();
        bad[16] = 0;
        bad[24] = 0;
        bad
    }

    #[test]
    fn a_sound_collection_passes_and_a_zero_sized_free_object_is_refused() {
        let good = collection(4096, &[(1, b"T-shirt/top"), (2, b"Trouser"), (3, b"")]);
        assert_eq!(gheap_check(&good, 8), Ok(()));
        // Its first 4096 bytes of a larger collection: not judged (the whole one is read next).
        let big = collection(8192, &[(1, &[7u8; 5000])]);
        assert_eq!(gheap_check(&big[..4096], 8), Ok(()));
        assert_eq!(gheap_check(&big, 8), Ok(()));

        // The first object's index and size zeroed (what the fuzz's hang had): refused, naming the offset.
        let why = gheap_check(&bad_free(&good), 8).unwrap_err();
        assert!(why.contains("offset 16") && why.contains("size 0"), "{why}");
        // The same met later in the walk: the free-space object after the three objects, size zeroed.
        let mut late = good.clone();
        let free_at = 16 + (16 + 16) + (16 + 8) + 16;
        assert_eq!(late[free_at], 0, "index 0 of the free space");
        late[free_at + 8..free_at + 16].fill(0);
        assert!(gheap_check(&late, 8).unwrap_err().contains(&format!("offset {free_at}")));
    }

    #[test]
    fn objects_past_the_end_are_refused_and_what_is_not_a_collection_is_left_to_hdf5() {
        let good = collection(4096, &[(1, b"abc")]);
        // An object claiming more bytes than the collection holds.
        let mut long = good.clone();
        long[24..32].copy_from_slice(&10_000u64.to_le_bytes());
        assert!(gheap_check(&long, 8).unwrap_err().contains("claims 10000 bytes"));
        // A size near 2^64 aligns to 0 in HDF5's arithmetic: its walk goes on into the object's bytes, as here,
        // and meets the zeros after "abc" (index 0, size 0): the loop.
        long[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(gheap_check(&long, 8).unwrap_err().contains("size 0"));
        // Raw data that starts like a collection (a read of another length), a collection below HDF5's minimum.
        assert_eq!(gheap_check(&bad_free(&good)[..4000], 8), Ok(()));
        let mut small = collection(2048, &[(1, b"abc")]);
        small[32..48].fill(0);
        assert_eq!(gheap_check(&small, 8), Ok(()));
        // Not a collection at all, a wrong version, a truncated header.
        assert_eq!(gheap_check(b"not a heap", 8), Ok(()));
        let mut v2 = bad_free(&good);
        v2[4] = 2;
        assert_eq!(gheap_check(&v2, 8), Ok(()));
        assert_eq!(gheap_check(&good[..10], 8), Ok(()));
    }
}
