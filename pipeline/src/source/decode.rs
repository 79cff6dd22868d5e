//! Encoded images (PNG, JPEG, GIF, WebP, TIFF, BMP: the `image` crate's decoders, the format told by content) to
//! pixels, for image folders and the encoded HDF5 layout; a GIF (or an animated WebP) gives its first frame, a
//! multi-page TIFF its first page. A file that is not a whole, plausible image is an error naming it, never pixels
//! made up. Every format goes through the same checks:
//! - files larger than [`max_file_bytes`] are not read (a 30 GB `.jpg`, or a device, would fill memory);
//! - the header's size is checked before any pixel is allocated: both sides in `1..=`[`MAX_SIDE`], at most
//!   `max_pixels` pixels, and the decoded buffer within `image::Limits::max_alloc` (which every decoder is given,
//!   and `png`, `gif`, `tiff` and `image-webp` also apply to their own buffers);
//! - a JPEG must hold its end-of-image marker (FF D9) after its first scan. `image` runs zune-jpeg leniently, which
//!   decodes a JPEG cut anywhere in its image data and fills the missing rest grey; the marker is what such a file
//!   lacks. Bytes after the marker are allowed (cameras append data there), and an EOI inside an embedded
//!   thumbnail does not count (segments before the scan are skipped by their lengths). The check reads the
//!   segment headers and, from the end backwards, the last bytes: no second pass over the image data.
//! - a PNG cut in its image data is already an error from `png` (unexpected end of file, or an incomplete
//!   deflate stream); a cut after the last IDAT chunk loses no pixels and is accepted.
//!
//! Not caught: damage inside a JPEG's entropy-coded data that leaves the marker in place (a flipped bit, deleted
//! bytes): JPEG has no checksum and the lenient decoder renders what it can. The encoded HDF5 layout's CRC-32
//! covers that; for image folders only a strict decoder would (zune-jpeg's strict mode is not reachable through
//! `image`).

use std::io::{Cursor, Read};
use std::path::Path;

use image::ImageDecoder;
use selfsup_augment::Image;

use super::{DataError, MAX_SIDE};

/// Decoding refuses images whose header claims more pixels than this (a 100k x 100k PNG is not allocated).
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// The largest encoded file read for an image of at most `max_pixels` pixels: 8 bytes a pixel (16-bit RGBA stored
/// uncompressed) plus 64 MiB of metadata and trailing data. Anything larger is not an image this reader decodes.
pub fn max_file_bytes(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(8).saturating_add(64 << 20)
}

/// Reads an image file, refusing one larger than [`max_file_bytes`] (checked on the open file, and again while
/// reading: a file that grows, or a device, stops there).
pub(crate) fn read_file(path: &Path, max_pixels: u64) -> Result<Vec<u8>, DataError> {
    let io = |e| DataError::io(path, e);
    let max = max_file_bytes(max_pixels);
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let too_big = |len: u64| DataError::Invalid {
        path: path.into(),
        message: format!("{len} bytes: larger than an image of at most {max_pixels} pixels can be ({max} bytes)"),
    };
    if len > max {
        return Err(too_big(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Decodes one encoded image (PNG, JPEG, GIF, WebP, TIFF or BMP, recognised by content) to `channels` (1 or 3) channels, refusing
/// images whose header claims more than `max_pixels` pixels. `path` only names the image in errors.
pub(crate) fn decode_bytes(bytes: &[u8], channels: u8, max_pixels: u64, path: &Path) -> Result<Image, DataError> {
    super::timed_decode(|| decode_bytes_untimed(bytes, channels, max_pixels, path))
}

fn decode_bytes_untimed(bytes: &[u8], channels: u8, max_pixels: u64, path: &Path) -> Result<Image, DataError> {
    let invalid = |message: String| DataError::Invalid { path: path.into(), message };
    let decode_err = |error| DataError::Decode { path: path.to_path_buf(), error };
    // The format comes from the content, not the extension (a PNG named .jpg still decodes).
    let mut reader =
        image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| DataError::io(path, e))?;
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        jpeg_is_whole(bytes).map_err(invalid)?;
    }
    let limits = limits_for(max_pixels);
    let max_alloc = limits.max_alloc.unwrap_or(u64::MAX);
    // Width and height limits are checked here rather than through `image::Limits`, whose error would not say
    // which size was refused. One decoder reads the header and then the pixels (the header is parsed once).
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(decode_err)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(invalid(format!("{w}x{h} pixels: an empty image")));
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(invalid(format!("{w}x{h} pixels: a side exceeds the limit of {MAX_SIDE}")));
    }
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(invalid(format!("{w}x{h} pixels exceeds the limit of {max_pixels}")));
    }
    if decoder.total_bytes() > max_alloc {
        let (n, color) = (decoder.total_bytes(), decoder.color_type());
        return Err(invalid(format!("{w}x{h} {color:?} is {n} bytes decoded: exceeds the limit of {max_alloc}")));
    }
    let img = image::DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    let (width, height) = (img.width(), img.height());
    let data = if channels == 1 { img.into_luma8().into_raw() } else { img.into_rgb8().into_raw() };
    Ok(Image { width, height, channels, data })
}

fn limits_for(max_pixels: u64) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(4));
    limits
}

/// Checks that a JPEG (starting with SOI, FF D8) holds an end-of-image marker after the start of its first scan
/// (see the module doc). Segments before the scan are skipped by their lengths; fill bytes (FF) before a marker
/// and stray bytes between segments are passed over, as the decoder does.
fn jpeg_is_whole(bytes: &[u8]) -> Result<(), String> {
    let cut = |where_: &str| format!("truncated JPEG: the file ends {where_}");
    let mut at = 2;
    let scan = loop {
        let ff = bytes.get(at..).and_then(|rest| rest.iter().position(|&b| b == 0xFF));
        let Some(ff) = ff else { return Err(cut("before its image data")) };
        at += ff;
        while bytes.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        match bytes.get(at + 1) {
            None => return Err(cut("before its image data")),
            Some(0xDA) => break at,
            Some(0xD9) => return Err("not a JPEG image: end-of-image marker before any image data".into()),
            // Markers without a length (RSTn, TEM), and a stuffed zero where no marker is.
            Some(0x00 | 0x01 | 0xD0..=0xD7) => at += 2,
            Some(_) => {
                let len = bytes.get(at + 2..at + 4).ok_or_else(|| cut("inside a segment header"))?;
                at += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
            }
        }
    };
    // In the entropy-coded data FF is always followed by 00 or a restart marker, so FF D9 is the end marker (or
    // part of a later scan's tables, or of trailing data: both come after a complete first scan).
    if bytes[scan..].windows(2).rev().any(|w| w == [0xFF, 0xD9]) {
        Ok(())
    } else {
        Err(format!("{}: no end-of-image marker (FF D9) after its image data", cut("early")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 5) as u8, (y * 3) as u8, (x ^ y) as u8]));
        let mut v = Vec::new();
        img.write_to(&mut Cursor::new(&mut v), image::ImageFormat::Jpeg).unwrap();
        v
    }

    #[test]
    fn whole_jpegs_pass_and_cut_ones_fail_at_every_length() {
        let v = jpeg(40, 24);
        assert_eq!(jpeg_is_whole(&v), Ok(()));
        // Trailing data after EOI (what cameras append) is fine.
        let mut trailing = v.clone();
        trailing.extend_from_slice(&[0u8; 1000]);
        assert_eq!(jpeg_is_whole(&trailing), Ok(()));
        for cut in 2..v.len() - 1 {
            assert!(jpeg_is_whole(&v[..cut]).is_err(), "cut at {cut} of {}", v.len());
        }
    }

    #[test]
    fn an_eoi_in_an_embedded_thumbnail_does_not_count() {
        let main = jpeg(40, 24);
        let thumb = jpeg(8, 8);
        // SOI, APP1 holding a whole JPEG (with its own EOI), then the rest of the main image.
        let mut v = vec![0xFF, 0xD8, 0xFF, 0xE1];
        v.extend_from_slice(&((thumb.len() + 2) as u16).to_be_bytes());
        v.extend_from_slice(&thumb);
        v.extend_from_slice(&main[2..]);
        assert_eq!(jpeg_is_whole(&v), Ok(()));
        let scan = v.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
        assert!(jpeg_is_whole(&v[..scan + 40]).is_err());
        assert!(decode_bytes(&v[..scan + 40], 3, DEFAULT_MAX_PIXELS, Path::new("t.jpg")).is_err());
        assert_eq!(decode_bytes(&v, 3, DEFAULT_MAX_PIXELS, Path::new("t.jpg")).unwrap().width, 40);
    }
}
