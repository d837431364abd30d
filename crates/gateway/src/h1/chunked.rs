//! A strict, streaming follower of chunked bodies (RFC 9112 §7.1).
//!
//! [`Chunked::next`] takes whatever bytes have arrived and says how many of
//! them, from the front, are framing (chunk-size lines, the CRLF after
//! data, the trailer section) or data; a proxy copies both verbatim and a
//! consumer that wants the payload keeps only the data. What it accepts:
//! a size of 1 to 15 hex digits (no sign, no leading spaces, trailing
//! whitespace only before `;`), extensions after `;` of printable
//! characters and tabs, up to a bounded length, every line ended by CRLF (a bare LF is refused: a peer that
//! accepts it would see different chunk boundaries), exactly CRLF after a
//! chunk's data, and trailer lines of the form `name:value` up to a bounded
//! total. Anything else is a [`ChunkError`]: the body, and the connection,
//! cannot be trusted further.

use super::head::is_tchar;

/// Why a chunked body is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk size that is not 1 to 15 hex digits.
    #[error("a chunk size is not 1 to 15 hexadecimal digits")]
    BadSize,
    /// A chunk extension with a control character, or past the limit.
    #[error("a chunk extension is malformed or too long")]
    BadExtension,
    /// A line ended by LF alone, or bytes other than CRLF after data.
    #[error("a chunk line does not end with CRLF")]
    BadLineEnd,
    /// A trailer line that is not `name: value`, or trailers past the limit.
    #[error("the chunked body's trailer section is malformed or too long")]
    BadTrailer,
}

/// What [`Chunked::next`] consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Framing bytes (sizes, extensions, line ends, trailers).
    Framing(usize),
    /// Body data.
    Data(usize),
    /// The body's last bytes (framing); nothing after them belongs to it.
    End(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Size digits so far (`digits` of them).
    Size { size: u64, digits: u8 },
    /// Whitespace after the size, which only `;` may follow (BWS).
    SizeWs { size: u64 },
    /// Inside an extension: the chunk's size, and the extension's bytes so far.
    Ext { size: u64, len: usize },
    /// Saw the CR ending a size line (the last chunk's when `size` is 0).
    SizeLf { size: u64 },
    /// Data bytes left in the chunk.
    Data(u64),
    /// Expecting the CR after data.
    DataCr,
    /// Expecting the LF after data.
    DataLf,
    /// At the start of a trailer line (or the final blank line).
    TrailerStart,
    /// Inside a trailer line: whether a colon was seen, and whether the
    /// name had a character.
    Trailer { colon: bool, named: bool },
    /// Saw the CR ending a trailer line; `blank` when the line was empty.
    TrailerLf { blank: bool },
    /// The body ended.
    Done,
}

/// Follows one chunked body (see the module docs).
#[derive(Debug, Clone)]
pub struct Chunked {
    state: State,
    max_ext: usize,
    max_trailers: usize,
    trailer_bytes: usize,
}

impl Default for Chunked {
    /// Extensions up to 1 KiB per chunk, trailers up to 16 KiB.
    fn default() -> Self {
        Self::new(1024, 16 * 1024)
    }
}

impl Chunked {
    /// A follower allowing `max_ext` bytes of extensions per chunk and
    /// `max_trailers` bytes of trailer section (its final CRLF included).
    pub fn new(max_ext: usize, max_trailers: usize) -> Self {
        Self {
            state: State::Size { size: 0, digits: 0 },
            max_ext,
            max_trailers,
            trailer_bytes: 0,
        }
    }

    /// Whether the whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes a prefix of `input`: at least one byte when `input` is not
    /// empty and the body has not ended; once it has, `End(0)` for any
    /// non-empty input (an empty input gives `Framing(0)`).
    pub fn next(&mut self, input: &[u8]) -> Result<Piece, ChunkError> {
        if let State::Data(left) = self.state {
            let n = left.min(input.len() as u64);
            self.state = if n == left {
                State::DataCr
            } else {
                State::Data(left - n)
            };
            return Ok(Piece::Data(n as usize));
        }
        for (i, &b) in input.iter().enumerate() {
            self.state = match self.state {
                State::Done => return Ok(Piece::End(i)),
                State::Data(_) => return Ok(Piece::Framing(i)),
                State::Size { size, digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < 15 => State::Size {
                        size: size << 4 | u64::from(d),
                        digits: digits + 1,
                    },
                    Some(_) => return Err(ChunkError::BadSize),
                    None if digits == 0 => return Err(ChunkError::BadSize),
                    None if b == b';' => State::Ext { size, len: 0 },
                    None if b == b' ' || b == b'\t' => State::SizeWs { size },
                    None if b == b'\r' => State::SizeLf { size },
                    None if b == b'\n' => return Err(ChunkError::BadLineEnd),
                    None => return Err(ChunkError::BadSize),
                },
                State::SizeWs { size } => match b {
                    b' ' | b'\t' => State::SizeWs { size },
                    b';' => State::Ext { size, len: 0 },
                    _ => return Err(ChunkError::BadExtension),
                },
                State::Ext { size, len } => {
                    if b == b'\r' {
                        State::SizeLf { size }
                    } else if b == b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    } else if len >= self.max_ext || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err(ChunkError::BadExtension);
                    } else {
                        State::Ext { size, len: len + 1 }
                    }
                }
                State::SizeLf { size } => match b {
                    b'\n' if size == 0 => State::TrailerStart,
                    b'\n' => State::Data(size),
                    _ => return Err(ChunkError::BadLineEnd),
                },
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(ChunkError::BadLineEnd),
                },
                State::DataLf => match b {
                    b'\n' => State::Size { size: 0, digits: 0 },
                    _ => return Err(ChunkError::BadLineEnd),
                },
                State::TrailerStart | State::Trailer { .. } | State::TrailerLf { .. } => {
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > self.max_trailers {
                        return Err(ChunkError::BadTrailer);
                    }
                    self.trailer(b)?
                }
            };
            if self.state == State::Done {
                return Ok(Piece::End(i + 1));
            }
        }
        Ok(Piece::Framing(input.len()))
    }

    fn trailer(&self, b: u8) -> Result<State, ChunkError> {
        Ok(match self.state {
            State::TrailerStart => match b {
                b'\r' => State::TrailerLf { blank: true },
                b':' | b' ' | b'\t' | b'\n' => return Err(ChunkError::BadTrailer),
                _ if is_tchar(b) => State::Trailer {
                    colon: false,
                    named: true,
                },
                _ => return Err(ChunkError::BadTrailer),
            },
            State::Trailer { colon, named } => match b {
                b'\r' if colon => State::TrailerLf { blank: false },
                b'\r' | b'\n' => return Err(ChunkError::BadTrailer),
                b':' if !colon && named => State::Trailer { colon: true, named },
                _ if !colon && is_tchar(b) => State::Trailer { colon, named },
                _ if colon && (b >= 0x20 || b == b'\t') && b != 0x7f => {
                    State::Trailer { colon, named }
                }
                _ => return Err(ChunkError::BadTrailer),
            },
            State::TrailerLf { blank } => match b {
                b'\n' if blank => State::Done,
                b'\n' => State::TrailerStart,
                _ => return Err(ChunkError::BadLineEnd),
            },
            _ => return Err(ChunkError::BadTrailer),
        })
    }
}
