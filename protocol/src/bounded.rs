//! Lists and strings decoded with a cap on their length, refused at the first element
//! (or the declared length) over it.
//!
//! The codec's byte limit bounds a frame, not what decoding it allocates: an empty
//! tensor takes three bytes on the wire and about a hundred in memory, so a frame of
//! them would decode to gigabytes. Every list a peer sends is therefore capped while
//! it is decoded, and no buffer is sized from a declared length beyond the cap.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

/// Decodes a list of at most `MAX` elements (for `#[serde(deserialize_with)]`).
pub fn list<'de, const MAX: usize, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Bounded::new(MAX).deserialize(deserializer)
}

/// A list of at most `max` elements, as a seed for a field decoded by hand.
pub struct Bounded<T> {
    max: usize,
    element: PhantomData<T>,
}

impl<T> Bounded<T> {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            element: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<T>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of at most {} elements", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let too_long = || de::Error::custom(format!("a list longer than {}", self.max));
        let declared = seq.size_hint().unwrap_or(0);
        if declared > self.max {
            return Err(too_long());
        }
        let mut items = Vec::with_capacity(declared);
        while let Some(item) = seq.next_element()? {
            if items.len() == self.max {
                return Err(too_long());
            }
            items.push(item);
        }
        Ok(items)
    }
}

/// Decodes a string of at most `MAX` bytes (for `#[serde(deserialize_with)]`): a
/// reason or a name that a peer sends is shown to users and copied into logs and
/// errors, so it may not take the whole frame.
pub fn string<'de, const MAX: usize, D>(deserializer: D) -> Result<String, D::Error>
where
    D: Deserializer<'de>,
{
    deserializer.deserialize_string(BoundedString(MAX))
}

struct BoundedString(usize);

impl BoundedString {
    fn check<E: de::Error>(&self, len: usize) -> Result<(), E> {
        match len > self.0 {
            true => Err(E::custom(format!("a string longer than {} bytes", self.0))),
            false => Ok(()),
        }
    }
}

impl Visitor<'_> for BoundedString {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a string of at most {} bytes", self.0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.check(v.len())?;
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        self.check(v.len())?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use crate::{decode, encode};

    #[derive(Debug, Deserialize)]
    struct Capped {
        #[serde(deserialize_with = "super::list::<3, _, _>")]
        items: Vec<u16>,
    }

    #[test]
    fn refuses_lists_over_the_cap() {
        let ok: Capped = decode(&encode(&vec![1u16, 2, 3]).unwrap()).unwrap();
        assert_eq!(ok.items, [1, 2, 3]);
        assert!(decode::<Capped>(&encode(&vec![1u16; 4]).unwrap()).is_err());
        // A declared length far over the cap is refused before anything is read.
        let mut bytes = vec![0xfc];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode::<Capped>(&bytes).is_err());
    }

    #[derive(Debug, Deserialize, serde::Serialize)]
    struct Named {
        #[serde(deserialize_with = "super::string::<5, _>")]
        name: String,
    }

    #[test]
    fn strings_are_capped_while_decoding() {
        let short = Named {
            name: "abcde".into(),
        };
        assert_eq!(
            decode::<Named>(&encode(&short).unwrap()).unwrap().name,
            "abcde"
        );
        let long = Named {
            name: "abcdef".into(),
        };
        let err = decode::<Named>(&encode(&long).unwrap()).unwrap_err();
        assert!(err.to_string().contains("longer than 5"), "{err}");
    }
}
