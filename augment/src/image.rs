//! [`Image`]: an owned 8-bit image in HWC (interleaved) layout with 1 or 3 channels, the
//! single currency of every op in this crate.

use crate::error::AugmentError;

/// An 8-bit image, HWC layout, channels 1 (gray) or 3 (RGB).
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub data: Vec<u8>,
}

impl Image {
    /// Checks that `data` holds exactly `width * height * channels` bytes, that both sides are
    /// non-zero (a crop of an empty image has no meaning) and that channels is 1 or 3.
    pub fn new(width: u32, height: u32, channels: u8, data: Vec<u8>) -> Result<Image, AugmentError> {
        if channels != 1 && channels != 3 {
            return Err(AugmentError::BadImage { message: format!("channels must be 1 or 3, got {channels}") });
        }
        if width == 0 || height == 0 {
            return Err(AugmentError::BadImage { message: format!("size must be non-zero, got {width}x{height}") });
        }
        let want = width as usize * height as usize * channels as usize;
        if data.len() != want {
            return Err(AugmentError::BadImage {
                message: format!("{width}x{height}x{channels} needs {want} bytes, got {}", data.len()),
            });
        }
        Ok(Image { width, height, channels, data })
    }

    /// A black image.
    ///
    /// # Panics
    /// If `c` is not 1 or 3 (a programming error, not a data error).
    pub fn zeros(w: u32, h: u32, c: u8) -> Image {
        assert!(c == 1 || c == 3, "Image::zeros: channels must be 1 or 3, got {c}");
        Image { width: w, height: h, channels: c, data: vec![0; w as usize * h as usize * c as usize] }
    }

    /// Number of pixels (`width * height`).
    pub fn pixels(&self) -> usize {
        self.width as usize * self.height as usize
    }

    /// Bytes per row.
    pub fn stride(&self) -> usize {
        self.width as usize * self.channels as usize
    }

    /// Value of channel `c` at column `x`, row `y`.
    pub fn get(&self, x: u32, y: u32, c: u8) -> u8 {
        self.data[(y as usize * self.width as usize + x as usize) * self.channels as usize + c as usize]
    }

    /// Makes `self` a copy of `src`, reusing `self`'s allocation (derived `clone_from` would not).
    pub fn copy_from(&mut self, src: &Image) {
        self.width = src.width;
        self.height = src.height;
        self.channels = src.channels;
        self.data.clear();
        self.data.extend_from_slice(&src.data);
    }

    /// Sets the shape and resizes `data` to match without initialising it meaningfully; the
    /// caller overwrites every byte. Keeps the allocation.
    pub(crate) fn reshape(&mut self, width: u32, height: u32, channels: u8) {
        self.width = width;
        self.height = height;
        self.channels = channels;
        self.data.resize(width as usize * height as usize * channels as usize, 0);
    }
}
