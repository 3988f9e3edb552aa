//! A deserializer adapter that reads structs from maps only.
//!
//! serde's derived structs also accept a sequence of their fields in order, so
//! `["abc12345", "ws_1", "10.0.0.1"]` would read as a sandbox and `[]` as an empty state.
//! Neither the JSON of the control API nor the TOML of operators means that: wrapping a
//! deserializer in [`Strict`] makes every struct, at any depth, refuse a sequence with
//! serde's own "invalid type" error (so a path-tracking wrapper around it still names the
//! field). Everything else is passed through unchanged.

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use std::fmt;

/// `deserializer`, with structs read from maps only (at every depth).
pub struct Strict<D>(pub D);

/// Deserializes `T` from `d`, structs from maps only.
pub fn deserialize<'de, D: Deserializer<'de>, T: de::Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    T::deserialize(Strict(d))
}

struct Wrap<V> {
    visitor: V,
    /// The visitor reads a struct: a sequence is refused.
    no_seq: bool,
}

impl<V> Wrap<V> {
    fn new(visitor: V) -> Self {
        Wrap { visitor, no_seq: false }
    }
}

struct Seed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Strict(d))
    }
}

macro_rules! forward {
    ($($method:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.0.$method(Wrap::new(visitor))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<D> {
    type Error = D::Error;

    forward!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_unit_struct(name, Wrap::new(visitor))
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_newtype_struct(name, Wrap::new(visitor))
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple(len, Wrap::new(visitor))
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(self, name: &'static str, len: usize, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple_struct(name, len, Wrap::new(visitor))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_struct(name, fields, Wrap { visitor, no_seq: true })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_enum(name, variants, Wrap::new(visitor))
    }
    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

macro_rules! visit {
    ($($method:ident($t:ty)),* $(,)?) => {$(
        fn $method<E: de::Error>(self, v: $t) -> Result<V::Value, E> {
            self.visitor.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(f)
    }

    visit!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>),
    );

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.visitor.visit_none()
    }
    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.visitor.visit_unit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.visitor.visit_some(Strict(d))
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.visitor.visit_newtype_struct(Strict(d))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        if self.no_seq {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
        }
        self.visitor.visit_seq(Access(seq))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(Access(map))
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_enum(Access(data))
    }
}

/// A sequence, map, enum or variant whose parts are read strictly.
struct Access<A>(A);

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Access<A> {
    type Error = A::Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Seed(seed))
    }
    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Access<A> {
    type Error = A::Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(Seed(seed))
    }
    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(Seed(seed))
    }
    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Access<A> {
    type Error = A::Error;
    type Variant = Access<A::Variant>;
    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Access<A::Variant>), A::Error> {
        self.0.variant_seed(Seed(seed)).map(|(v, a)| (v, Access(a)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Access<A> {
    type Error = A::Error;
    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Seed(seed))
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Wrap::new(visitor))
    }
    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], visitor: V) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, Wrap { visitor, no_seq: true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Sandbox, State, Workspace};

    fn json<T: de::DeserializeOwned>(text: &str) -> Result<T, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        serde_path_to_error::deserialize(Strict(v)).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    #[test]
    fn structs_are_read_from_maps_only_at_every_depth() {
        // Plain serde takes these.
        assert!(serde_json::from_str::<State>("[]").is_ok());
        assert!(serde_json::from_str::<Sandbox>(r#"["a","w","10.0.0.1"]"#).is_ok());
        // Strictly, refused with the path of the struct.
        assert!(json::<State>("[]").is_err_and(|e| e.contains("invalid type: sequence")));
        let e = json::<Sandbox>(r#"{"id":"a","workspace":"w","address":"10.0.0.1","previews":[[5173,"public"]]}"#).unwrap_err();
        assert!(e.starts_with("previews[0]: invalid type: sequence"), "{e}");
        let e = json::<Workspace>(r#"{"id":"w","slug":"s","preview_domain":["p.example.com",true]}"#).unwrap_err();
        assert!(e.starts_with("preview_domain: invalid type: sequence"), "{e}");
        // Lists, maps, options, enums and newtypes pass.
        let s: Sandbox =
            json(r#"{"id":"a","workspace":"w","address":"10.0.0.1","state":"suspended","previews":[{"port":5173,"access":"public"}]}"#)
                .expect("sandbox");
        assert_eq!(s.previews.len(), 1);
        let t: toml::Value =
            toml::from_str("[[sandboxes]]\nid = \"a\"\nworkspace = \"w\"\naddress = \"10.0.0.1\"\npreviews = [[3000]]\n").expect("toml");
        let e = serde_path_to_error::deserialize::<_, State>(Strict(t)).map(|_| ()).unwrap_err();
        assert_eq!(e.path().to_string(), "sandboxes[0].previews[0]");
    }
}
