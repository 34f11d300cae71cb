//! Reading query results through PostgreSQL's binary COPY: `COPY (<query>) TO STDOUT (FORMAT
//! binary)` and a small parser straight into plain values. It skips sqlx's per-row decoding,
//! which costs several times the bare read on millions of rows.
//!
//! The format (PostgreSQL docs, "COPY … Binary Format"): an 11-byte signature, a 32-bit flags
//! word, a 32-bit header-extension length and that many bytes; then per tuple a 16-bit field
//! count (-1 ends the data) and per field a 32-bit length (-1 for NULL) and the value in its
//! binary send format, big-endian.

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

#[derive(Debug, thiserror::Error)]
#[error("binary COPY data: {0}")]
pub struct CopyError(pub String);

/// A cursor over the binary COPY stream of one query.
pub struct Tuples<'a> {
    data: &'a [u8],
    pos: usize,
    fields: usize,
}

impl<'a> Tuples<'a> {
    /// Checks the header; every tuple must have `fields` fields.
    pub fn new(data: &'a [u8], fields: usize) -> Result<Self, CopyError> {
        if data.len() < 19 || &data[..11] != SIGNATURE {
            return Err(CopyError("no binary COPY signature".into()));
        }
        let ext = u32::from_be_bytes(data[15..19].try_into().expect("4 bytes")) as usize;
        Ok(Tuples {
            data,
            pos: 19 + ext,
            fields,
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CopyError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.data.len());
        let end = end.ok_or_else(|| CopyError("truncated".into()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Starts the next tuple; `false` at the end of the data.
    pub fn next_tuple(&mut self) -> Result<bool, CopyError> {
        let n = i16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes"));
        if n == -1 {
            return Ok(false);
        }
        if n as usize != self.fields {
            return Err(CopyError(format!("{n} fields, expected {}", self.fields)));
        }
        Ok(true)
    }

    /// The next field's bytes, `None` for NULL.
    pub fn field(&mut self) -> Result<Option<&'a [u8]>, CopyError> {
        let len = i32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes"));
        if len < 0 {
            return Ok(None);
        }
        self.take(len as usize).map(Some)
    }

    pub fn i64(&mut self) -> Result<Option<i64>, CopyError> {
        match self.field()? {
            None => Ok(None),
            Some(b) => {
                Ok(Some(i64::from_be_bytes(b.try_into().map_err(|_| {
                    CopyError(format!("int8 of {} bytes", b.len()))
                })?)))
            }
        }
    }

    /// The whole tuple a [`Stream`]'s callback is positioned on (its field count and every
    /// field, whatever has been read of it), to keep and read again with [`each_tuple`].
    pub fn tuple_bytes(&self) -> &'a [u8] {
        self.data
    }

    pub fn bool(&mut self) -> Result<Option<bool>, CopyError> {
        match self.field()? {
            None => Ok(None),
            Some([b]) => Ok(Some(*b != 0)),
            Some(b) => Err(CopyError(format!("bool of {} bytes", b.len()))),
        }
    }
}

/// Tuples kept one after another as [`Tuples::tuple_bytes`] gave them (no header, no trailer),
/// each handed to `row` positioned on it.
pub fn each_tuple<E: From<CopyError>>(
    data: &[u8],
    fields: usize,
    mut row: impl FnMut(&mut Tuples<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut pos = 0;
    while pos < data.len() {
        let len = match tuple_len(&data[pos..], fields)? {
            Some(len) if len > 2 => len,
            _ => return Err(CopyError("a kept tuple is truncated".into()).into()),
        };
        let mut t = Tuples {
            data: &data[pos..pos + len],
            pos: 0,
            fields,
        };
        t.next_tuple()?;
        row(&mut t)?;
        pos += len;
    }
    Ok(())
}

/// The binary COPY stream of one query fed chunk by chunk as it arrives (PostgreSQL sends a
/// message per row, but any split is accepted), each complete tuple handed to a callback as a
/// [`Tuples`] positioned on it: no buffer of the whole answer.
pub struct Stream {
    pending: Vec<u8>,
    fields: usize,
    header: bool,
    ended: bool,
}

impl Stream {
    pub fn new(fields: usize) -> Self {
        Stream {
            pending: Vec::new(),
            fields,
            header: false,
            ended: false,
        }
    }

    /// Parses what `chunk` completes; `row` reads the fields of each tuple (or some of them).
    /// A chunk that starts on a tuple is parsed where it lies; only an unfinished tuple at its
    /// end is copied, to be completed by the next chunk.
    pub fn feed<E: From<CopyError>>(
        &mut self,
        chunk: &[u8],
        mut row: impl FnMut(&mut Tuples<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.pending.is_empty() {
            let used = self.parse(chunk, &mut row)?;
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            let mut data = std::mem::take(&mut self.pending);
            data.extend_from_slice(chunk);
            let used = self.parse(&data, &mut row)?;
            data.drain(..used);
            self.pending = data;
        }
        Ok(())
    }

    /// Parses the header (once) and every complete tuple at the start of `data`; the bytes
    /// used.
    fn parse<E: From<CopyError>>(
        &mut self,
        data: &[u8],
        row: &mut impl FnMut(&mut Tuples<'_>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut pos = 0;
        if !self.header {
            if data.len() < 19 {
                return Ok(0);
            }
            if &data[..11] != SIGNATURE {
                return Err(CopyError("no binary COPY signature".into()).into());
            }
            let ext = u32::from_be_bytes(data[15..19].try_into().expect("4 bytes")) as usize;
            if data.len() < 19 + ext {
                return Ok(0);
            }
            pos = 19 + ext;
            self.header = true;
        }
        while !self.ended {
            let Some(len) = tuple_len(&data[pos..], self.fields)? else {
                break;
            };
            if len == 2 {
                self.ended = true;
                pos += 2;
                break;
            }
            let mut t = Tuples {
                data: &data[pos..pos + len],
                pos: 0,
                fields: self.fields,
            };
            t.next_tuple()?;
            row(&mut t)?;
            pos += len;
        }
        Ok(pos)
    }

    /// Checks that the stream ended with its trailer and nothing after it.
    pub fn finish(&self) -> Result<(), CopyError> {
        if !self.ended {
            return Err(CopyError("truncated".into()));
        }
        if !self.pending.is_empty() {
            return Err(CopyError("data after the end of the stream".into()));
        }
        Ok(())
    }
}

/// The length of the tuple at the start of `data` if it is all there (2 for the trailer).
fn tuple_len(data: &[u8], fields: usize) -> Result<Option<usize>, CopyError> {
    if data.len() < 2 {
        return Ok(None);
    }
    let n = i16::from_be_bytes(data[..2].try_into().expect("2 bytes"));
    if n == -1 {
        return Ok(Some(2));
    }
    if n as usize != fields {
        return Err(CopyError(format!("{n} fields, expected {fields}")));
    }
    let mut pos = 2;
    for _ in 0..fields {
        let Some(b) = data.get(pos..pos + 4) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes(b.try_into().expect("4 bytes"));
        pos += 4 + len.max(0) as usize;
        if pos > data.len() {
            return Ok(None);
        }
    }
    Ok(Some(pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(tuples: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        for t in tuples {
            b.extend_from_slice(&(t.len() as i16).to_be_bytes());
            for f in t {
                match f {
                    None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(v) => {
                        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        b.extend_from_slice(v);
                    }
                }
            }
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    #[test]
    fn parses_ints_bools_text_and_nulls() {
        let data = stream(&[
            vec![
                Some(42i64.to_be_bytes().to_vec()),
                Some(vec![1]),
                Some(b"a1".to_vec()),
            ],
            vec![None, None, None],
        ]);
        let mut t = Tuples::new(&data, 3).unwrap();
        assert!(t.next_tuple().unwrap());
        assert_eq!(t.i64().unwrap(), Some(42));
        assert_eq!(t.bool().unwrap(), Some(true));
        assert_eq!(t.field().unwrap(), Some(&b"a1"[..]));
        assert!(t.next_tuple().unwrap());
        assert_eq!(
            (t.i64().unwrap(), t.bool().unwrap(), t.field().unwrap()),
            (None, None, None)
        );
        assert!(!t.next_tuple().unwrap());
    }

    #[test]
    fn kept_tuples_read_back_as_they_came() {
        let data = stream(&[
            vec![Some(1i64.to_be_bytes().to_vec()), Some(b"a".to_vec())],
            vec![Some(2i64.to_be_bytes().to_vec()), None],
            vec![Some(3i64.to_be_bytes().to_vec()), Some(b"ccc".to_vec())],
        ]);
        // Keep the odd ids, whatever was read of each tuple before deciding.
        let (mut s, mut kept) = (Stream::new(2), vec![]);
        for chunk in data.chunks(5) {
            s.feed(chunk, |t: &mut Tuples<'_>| {
                if t.i64()?.is_some_and(|id| id % 2 == 1) {
                    kept.extend_from_slice(t.tuple_bytes());
                }
                Ok::<(), CopyError>(())
            })
            .unwrap();
        }
        s.finish().unwrap();
        let mut back = vec![];
        each_tuple(&kept, 2, |t: &mut Tuples<'_>| {
            back.push((t.i64()?, t.field()?.map(<[u8]>::to_vec)));
            Ok::<(), CopyError>(())
        })
        .unwrap();
        assert_eq!(
            back,
            [
                (Some(1), Some(b"a".to_vec())),
                (Some(3), Some(b"ccc".to_vec()))
            ]
        );
        // A tuple cut short is refused, not read as the end.
        assert!(each_tuple(&kept[..kept.len() - 1], 2, |_| Ok::<(), CopyError>(())).is_err());
    }

    #[test]
    fn refuses_garbage() {
        assert!(Tuples::new(b"not copy data at all", 1).is_err());
        let mut data = stream(&[vec![Some(vec![1, 2, 3])]]);
        data.truncate(data.len() - 4);
        let mut t = Tuples::new(&data, 1).unwrap();
        assert!(t.next_tuple().unwrap());
        assert!(t.field().is_err());
    }

    #[test]
    fn a_stream_fed_in_any_split_gives_the_same_tuples() {
        let data = stream(&[
            vec![Some(7i64.to_be_bytes().to_vec()), Some(b"x".to_vec())],
            vec![None, Some(Vec::new())],
            vec![Some((-1i64).to_be_bytes().to_vec()), None],
        ]);
        let read = |chunks: Vec<&[u8]>| -> Vec<(Option<i64>, Option<Vec<u8>>)> {
            let mut s = Stream::new(2);
            let mut out = vec![];
            for c in chunks {
                s.feed(c, |t: &mut Tuples<'_>| -> Result<(), CopyError> {
                    let n = t.i64()?;
                    out.push((n, t.field()?.map(<[u8]>::to_vec)));
                    Ok(())
                })
                .unwrap();
            }
            s.finish().unwrap();
            out
        };
        let whole = read(vec![&data]);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0], (Some(7), Some(b"x".to_vec())));
        assert_eq!(whole[1], (None, Some(vec![])));
        for size in 1..data.len() {
            assert_eq!(read(data.chunks(size).collect()), whole, "chunks of {size}");
        }
        // Cut short: not finished.
        let mut s = Stream::new(2);
        s.feed(&data[..data.len() - 2], |_: &mut Tuples<'_>| {
            Ok::<(), CopyError>(())
        })
        .unwrap();
        assert!(s.finish().is_err());
    }
}
