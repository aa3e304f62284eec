//! Helper macros for the protocol modules.

/// Declares an "open" enumeration: a transparent newtype over an integer with named
/// constants, so values the peer may add later still round-trip instead of failing to
/// parse (the same idea as OpenVMM's `open_enum`). `Debug` prints the constant's name
/// when the value has one, the number otherwise. When two constants share a value the
/// first one declared names it.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident($inner:ty) {
            $(
                $(#[$cmeta:meta])*
                $cname:ident = $cval:expr,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        $vis struct $name(pub $inner);

        impl $name {
            $(
                $(#[$cmeta])*
                pub const $cname: Self = Self($cval);
            )*

            /// The name of the constant with this value, if there is one.
            pub const fn name(self) -> Option<&'static str> {
                $(
                    if self.0 == $cval {
                        return Some(stringify!($cname));
                    }
                )*
                None
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                Self(v)
            }
        }

        impl From<$name> for $inner {
            fn from(v: $name) -> Self {
                v.0
            }
        }
    };
}
