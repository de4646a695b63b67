//! Incremental UTF-8 validation for text messages that arrive in pieces (fragments, or one frame
//! over several reads). A sequence split across pieces is carried over (at most 3 bytes); an
//! invalid byte is reported as soon as it is seen ("fail fast"), not at the end of the message.

/// The bytes seen so far can never be valid UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidUtf8;

#[derive(Clone, Debug, Default)]
pub struct Utf8Stream {
    carry: [u8; 4],
    carry_len: u8,
}

impl Utf8Stream {
    /// Validates the next piece. Err means the message can never be valid UTF-8.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), InvalidUtf8> {
        while self.carry_len > 0 {
            let Some((&b, rest)) = data.split_first() else {
                return Ok(());
            };
            self.carry[self.carry_len as usize] = b;
            self.carry_len += 1;
            data = rest;
            match std::str::from_utf8(&self.carry[..self.carry_len as usize]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_some() => return Err(InvalidUtf8),
                Err(_) if self.carry_len == 4 => return Err(InvalidUtf8),
                Err(_) => {}
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) => match e.error_len() {
                Some(_) => Err(InvalidUtf8),
                None => {
                    let tail = &data[e.valid_up_to()..];
                    self.carry[..tail.len()].copy_from_slice(tail);
                    self.carry_len = tail.len() as u8;
                    Ok(())
                }
            },
        }
    }

    /// Whether the message may end here (no sequence left half-finished).
    pub fn complete(&self) -> bool {
        self.carry_len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_check(bytes: &[u8], cuts: &[usize]) -> bool {
        let mut v = Utf8Stream::default();
        let mut last = 0;
        for &c in cuts {
            let c = c.min(bytes.len()).max(last);
            if v.feed(&bytes[last..c]).is_err() {
                return false;
            }
            last = c;
        }
        v.feed(&bytes[last..]).is_ok() && v.complete()
    }

    #[test]
    fn known_cases() {
        assert!(split_check("κόσμε".as_bytes(), &[1, 2, 3]));
        assert!(!split_check(
            &[
                0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80
            ],
            &[12]
        ));
        assert!(!split_check(&[0xf4, 0x90, 0x80, 0x80], &[1])); // above U+10FFFF
        assert!(!split_check(&[0xe2, 0x82], &[])); // truncated at the end
        // Fail fast: the surrogate prefix is refused before the message ends.
        let mut v = Utf8Stream::default();
        assert!(v.feed(&[0x61, 0xed]).is_ok());
        assert!(v.feed(&[0xa0]).is_err());
    }

    proptest! {
        #[test]
        fn any_split_agrees_with_std(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                      cuts in proptest::collection::vec(0usize..64, 0..6)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert_eq!(split_check(&bytes, &cuts), std::str::from_utf8(&bytes).is_ok());
        }

        #[test]
        fn valid_strings_pass_in_any_split(s in "\\PC*", cuts in proptest::collection::vec(0usize..64, 0..6)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert!(split_check(s.as_bytes(), &cuts));
        }
    }
}
