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

    pub fn bool(&mut self) -> Result<Option<bool>, CopyError> {
        match self.field()? {
            None => Ok(None),
            Some([b]) => Ok(Some(*b != 0)),
            Some(b) => Err(CopyError(format!("bool of {} bytes", b.len()))),
        }
    }
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
    fn refuses_garbage() {
        assert!(Tuples::new(b"not copy data at all", 1).is_err());
        let mut data = stream(&[vec![Some(vec![1, 2, 3])]]);
        data.truncate(data.len() - 4);
        let mut t = Tuples::new(&data, 1).unwrap();
        assert!(t.next_tuple().unwrap());
        assert!(t.field().is_err());
    }
}
