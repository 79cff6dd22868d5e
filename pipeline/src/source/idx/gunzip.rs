//! Reading gzip files (RFC 1952) for the IDX source: every byte inflated is checked against its member's
//! CRC-32 and ISIZE before the stream reports its end, and nothing in the file is skipped unread.

use std::io::{BufRead, Read};

/// The inflated bytes of a gzip file (RFC 1952), member after member, each member's CRC-32 and ISIZE checked
/// against its trailer as soon as its deflate stream ends: a read that returns `Ok(0)` has verified every byte.
///
/// Several members are read as one stream, their contents concatenated, as `gunzip`, zlib's `gzread` and Python's
/// `gzip` do (`cat a.gz b.gz`, and BGZF-style block compressors, make such files): refusing them would refuse
/// files every other tool reads, and reading only the first member would make them "truncated". Bytes after the
/// last member that do not start another member (trailing garbage, zero padding) are refused: nothing in a file is
/// ignored unread. A reserved header flag, a wrong header CRC (FHCRC) or compression method are errors (RFC 1952
/// asks a reader to refuse them); MTIME, XFL, OS, the name and the comment do not change the data: they are passed over.
pub(super) struct Gunzip<R> {
    pub(super) r: R,
    inflate: flate2::Decompress,
    crc: flate2::Crc,
    /// Members whose trailer was checked.
    members: u32,
    state: Member,
}

#[derive(PartialEq)]
enum Member {
    Header,
    Body,
    End,
}

fn corrupt(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

fn cut(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, message)
}

impl<R: BufRead> Gunzip<R> {
    pub(super) fn new(r: R) -> Self {
        Gunzip {
            r,
            inflate: flate2::Decompress::new(false),
            crc: flate2::Crc::new(),
            members: 0,
            state: Member::Header,
        }
    }

    /// " (gzip member k)" after the first member, where it helps to say which.
    fn which(&self) -> String {
        if self.members == 0 {
            String::new()
        } else {
            format!(" (gzip member {})", self.members + 1)
        }
    }

    /// Reads one member's header (the file's first, or what follows a member's trailer).
    fn header(&mut self) -> std::io::Result<()> {
        let which = self.which();
        // Every header byte read goes into `crc`, for FHCRC.
        let crc = std::cell::RefCell::new(flate2::Crc::new());
        let take = |r: &mut R, n: usize, what: &str| -> std::io::Result<Vec<u8>> {
            let mut b = vec![0u8; n];
            r.read_exact(&mut b)
                .map_err(|_| cut(format!("truncated: the file ends inside a gzip header's {what}{which}")))?;
            crc.borrow_mut().update(&b);
            Ok(b)
        };
        let fixed = take(&mut self.r, 10, "first 10 bytes")?;
        if fixed[..2] != [0x1f, 0x8b] {
            return Err(corrupt(format!("not a gzip header (bytes {:02x?}){which}", &fixed[..2])));
        }
        let (method, flags) = (fixed[2], fixed[3]);
        if method != 8 {
            return Err(corrupt(format!("gzip compression method {method}, not deflate (8){which}")));
        }
        if flags & 0xe0 != 0 {
            return Err(corrupt(format!("gzip header: reserved flag bits set (FLG 0x{flags:02x}){which}")));
        }
        if flags & 0x04 != 0 {
            let n = take(&mut self.r, 2, "FEXTRA length")?;
            take(&mut self.r, usize::from(u16::from_le_bytes([n[0], n[1]])), "FEXTRA field")?;
        }
        for (flag, what) in [(0x08, "file name"), (0x10, "comment")] {
            if flags & flag != 0 {
                while take(&mut self.r, 1, what)?[0] != 0 {}
            }
        }
        if flags & 0x02 != 0 {
            let want = crc.borrow().sum() as u16;
            let have = take(&mut self.r, 2, "header CRC")?;
            if u16::from_le_bytes([have[0], have[1]]) != want {
                return Err(corrupt(format!("gzip header CRC (FHCRC) mismatch{which}")));
            }
        }
        Ok(())
    }

    /// Reads a member's trailer and checks it against the data the member inflated to.
    fn trailer(&mut self) -> std::io::Result<()> {
        let which = self.which();
        let mut t = [0u8; 8];
        self.r
            .read_exact(&mut t)
            .map_err(|_| cut(format!("truncated: the file ends inside the gzip trailer (CRC-32, ISIZE){which}")))?;
        let (crc, isize) = (u32::from_le_bytes([t[0], t[1], t[2], t[3]]), u32::from_le_bytes([t[4], t[5], t[6], t[7]]));
        if crc != self.crc.sum() {
            return Err(corrupt(format!(
                "gzip CRC-32 mismatch{which}: the trailer says {crc:08x}, the inflated data has {:08x}",
                self.crc.sum()
            )));
        }
        if isize != self.crc.amount() {
            return Err(corrupt(format!(
                "gzip ISIZE mismatch{which}: the trailer says {isize} bytes, the data inflates to {} (mod 2^32)",
                self.crc.amount()
            )));
        }
        self.members += 1;
        Ok(())
    }
}

impl<R: BufRead> Read for Gunzip<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.state {
                Member::End => return Ok(0),
                Member::Header => {
                    if self.members > 0 {
                        let next = self.r.fill_buf()?;
                        if next.is_empty() {
                            self.state = Member::End;
                            continue;
                        }
                        if next[0] != 0x1f || next.get(1).is_some_and(|&b| b != 0x8b) {
                            return Err(corrupt(format!(
                                "data after the end of gzip member {} that is not another gzip member (bytes {:02x?})",
                                self.members,
                                &next[..next.len().min(4)]
                            )));
                        }
                    }
                    self.header()?;
                    self.inflate.reset(false);
                    self.crc.reset();
                    self.state = Member::Body;
                }
                Member::Body => {
                    if out.is_empty() {
                        return Ok(0);
                    }
                    let input = self.r.fill_buf()?;
                    let eof = input.is_empty();
                    let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
                    let status = self
                        .inflate
                        .decompress(input, out, flate2::FlushDecompress::None)
                        .map_err(|e| corrupt(format!("corrupt deflate data{}: {e}", self.which())))?;
                    let used = (self.inflate.total_in() - in0) as usize;
                    let made = (self.inflate.total_out() - out0) as usize;
                    self.r.consume(used);
                    self.crc.update(&out[..made]);
                    let ended = status == flate2::Status::StreamEnd;
                    if ended {
                        self.trailer()?;
                        self.state = Member::Header;
                    }
                    if made > 0 {
                        return Ok(made);
                    }
                    if eof && !ended {
                        return Err(cut(format!("truncated: the file ends inside the deflate data{}", self.which())));
                    }
                    if used == 0 && !ended {
                        return Err(corrupt(format!("deflate data that does not progress{}", self.which())));
                    }
                }
            }
        }
    }
}
