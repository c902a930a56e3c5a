//! COMPRESS=DEFLATE (RFC 4978) as the observer sees it: a *copy* of one direction's raw DEFLATE
//! stream (RFC 1951, no zlib header) inflated piece by piece into a small scratch buffer, which
//! the framer reads like plain IMAP. The relayed octets are never touched; this only decides
//! what the observer is shown.
//!
//! Lifecycle: created when the backend's OK to `COMPRESS DEFLATE` is seen (never for sessions
//! that do not compress), dropped when the session ends or the stream turns out not to be
//! DEFLATE. Memory per direction: the inflater's 32 KiB window (DEFLATE's largest distance),
//! its Huffman tables and the scratch buffer (`Inflater::HEAP`, measured by a unit test).
//! Inflated octets are not kept: the framer skips literal octets by count as they pass through
//! the scratch buffer, so a message that inflates enormously (DEFLATE's ratio is at most about
//! 1032:1) costs CPU in proportion to its size, never memory.

use miniz_oxide::inflate::stream::{InflateState, inflate};
use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};

/// Inflated octets handed to the framer per step.
const SCRATCH: usize = 8 * 1024;

pub(crate) struct Inflater {
    state: Box<InflateState>,
    scratch: Box<[u8]>,
    /// The stream had a final block: anything after it is not DEFLATE.
    ended: bool,
}

/// The stream cannot be inflated from here on (corrupt, or octets after a final block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt;

impl Inflater {
    /// Heap octets one inflater holds (for the README's memory figures).
    #[cfg(test)]
    pub(crate) const HEAP: usize = std::mem::size_of::<InflateState>() + SCRATCH;

    pub(crate) fn new() -> Self {
        Inflater {
            state: InflateState::new_boxed(DataFormat::Raw),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            ended: false,
        }
    }

    /// Inflates `input` (the next octets of the stream, however it was cut), handing the
    /// inflated octets to `on` in order, in pieces of at most `SCRATCH`. After an error the
    /// stream is lost: the caller stops observing it.
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        mut on: impl FnMut(&[u8]),
    ) -> Result<(), Corrupt> {
        if self.ended {
            return if input.is_empty() {
                Ok(())
            } else {
                Err(Corrupt)
            };
        }
        loop {
            let step = inflate(&mut self.state, input, &mut self.scratch, MZFlush::None);
            input = input.get(step.bytes_consumed..).unwrap_or_default();
            let written = step.bytes_written.min(self.scratch.len());
            if written > 0 {
                on(&self.scratch[..written]);
            }
            match step.status {
                Ok(MZStatus::StreamEnd) => {
                    // A final block (RFC 4978 compressors never send one, but a peer may):
                    // all its output is out; more octets would not be DEFLATE.
                    self.ended = true;
                    return if input.is_empty() {
                        Ok(())
                    } else {
                        Err(Corrupt)
                    };
                }
                // Progress: go on until the input is used and nothing is pending (an empty
                // input may still flush output held in the window).
                Ok(_) if step.bytes_consumed > 0 || written > 0 => {}
                // Nothing moved: everything given is inflated and out.
                Ok(_) | Err(MZError::Buf) if input.is_empty() => return Ok(()),
                // No progress with input left, or invalid data.
                Ok(_) | Err(_) => return Err(Corrupt),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn deflate_sync(chunks: &[&[u8]]) -> Vec<u8> {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        for c in chunks {
            z.write_all(c).unwrap();
            z.flush().unwrap();
        }
        z.get_ref().clone()
    }

    fn inflate_all(inflater: &mut Inflater, wire: &[u8], cut: usize) -> Result<Vec<u8>, Corrupt> {
        let mut out = Vec::new();
        for piece in wire.chunks(cut.max(1)) {
            inflater.feed(piece, |p| out.extend_from_slice(p))?;
        }
        Ok(out)
    }

    #[test]
    fn inflates_however_the_stream_is_cut() {
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{i} line\r\n").into_bytes())
            .collect();
        let wire = deflate_sync(&[b"a1 NOOP\r\n", &text, b"a2 LOGOUT\r\n"]);
        let mut whole = b"a1 NOOP\r\n".to_vec();
        whole.extend_from_slice(&text);
        whole.extend_from_slice(b"a2 LOGOUT\r\n");
        for cut in [1, 2, 7, 100, 4096, 65536, wire.len()] {
            let got = inflate_all(&mut Inflater::new(), &wire, cut).unwrap();
            assert!(got == whole, "cut {cut}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut inflater = Inflater::new();
        // Block type 3 is reserved: invalid at once.
        assert_eq!(inflater.feed(&[0xff; 64], |_| {}), Err(Corrupt));
        // And stays an error.
        assert_eq!(inflater.feed(b"x", |_| {}), Err(Corrupt));
    }

    #[test]
    fn octets_after_a_final_block_are_an_error() {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(b"a1 NOOP\r\n").unwrap();
        let mut wire = z.finish().unwrap();
        let mut inflater = Inflater::new();
        let mut out = Vec::new();
        assert_eq!(inflater.feed(&wire, |p| out.extend_from_slice(p)), Ok(()));
        assert_eq!(out, b"a1 NOOP\r\n");
        wire.clear();
        assert_eq!(inflater.feed(b"more", |_| {}), Err(Corrupt));
    }

    #[test]
    fn memory_per_direction() {
        eprintln!("inflater heap: {} octets", Inflater::HEAP);
        const { assert!(Inflater::HEAP < 64 * 1024) };
    }
}
