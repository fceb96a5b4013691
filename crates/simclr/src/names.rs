//! Enums named in configs and on the command line, and counts named in
//! messages.

/// `count` and its noun, plural but for one: "1 epoch", "3 epochs".
pub(crate) fn counted(count: usize, noun: &str) -> String {
    match count {
        1 => format!("1 {noun}"),
        count => format!("{count} {noun}s"),
    }
}

/// Gives an enum of unit variants its names, in one place: `ALL` (in
/// declaration order), `name()`, `FromStr` that lists every name on a miss,
/// and serde through the same names, so a config file, a flag and an error
/// message spell a variant alike.
///
/// ```text
/// names!(Stem, "stem", { Imagenet => "imagenet", Cifar => "cifar" });
/// ```
macro_rules! names {
    ($ty:ident, $what:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: [$ty; [$($name),+].len()] = [$($ty::$variant),+];

            /// The name in configs and on the command line.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::Error;
            fn from_str(name: &str) -> $crate::Result<Self> {
                $ty::ALL.into_iter().find(|variant| variant.name() == name).ok_or_else(|| {
                    $crate::Error::InvalidArgument(format!(
                        concat!("unknown ", $what, " '{}': expected one of {}"),
                        name,
                        $ty::ALL.map($ty::name).join(", ")
                    ))
                })
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
                serializer.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
                let name = String::deserialize(deserializer)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        let counts = [0, 1, 2].map(|count| super::counted(count, "epoch"));
        assert_eq!(counts, ["0 epochs", "1 epoch", "2 epochs"]);
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fruit {
        Apple,
        BloodOrange,
    }

    names!(Fruit, "fruit", { Apple => "apple", BloodOrange => "blood-orange" });

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Basket {
        fruit: Fruit,
    }

    #[test]
    fn names_parse_print_and_serialise_alike() {
        assert_eq!(Fruit::ALL, [Fruit::Apple, Fruit::BloodOrange]);
        for fruit in Fruit::ALL {
            assert_eq!(fruit.name().parse::<Fruit>().unwrap(), fruit);
            let toml = toml::to_string(&Basket { fruit }).unwrap();
            assert_eq!(toml.trim(), format!("fruit = \"{}\"", fruit.name()));
            assert_eq!(toml::from_str::<Basket>(&toml).unwrap(), Basket { fruit });
        }
        let error = "pear".parse::<Fruit>().unwrap_err().to_string();
        assert!(error.contains("unknown fruit 'pear': expected one of apple, blood-orange"), "{error}");
        let error = toml::from_str::<Basket>("fruit = \"BloodOrange\"").unwrap_err().to_string();
        assert!(error.contains("unknown fruit 'BloodOrange': expected one of apple, blood-orange"), "{error}");
    }
}
