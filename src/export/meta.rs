//! Head names and strides in; YOLOv5's ONNX `metadata_props` values out:
//! `stride` = `str(int(max(stride)))` and `names` = `str(dict(enumerate(names)))`,
//! which `DetectMultiBackend` reads back with `int()` and `eval()`. The string
//! literals follow Python's `repr` so that `eval` (and our own `parse_names`)
//! gives the names back exactly.

/// `{0: 'a', 1: "it's"}` as Python prints the dict.
pub fn names_repr(names: &[String]) -> String {
    let items: Vec<String> = names.iter().enumerate().map(|(i, n)| format!("{i}: {}", py_str_repr(n))).collect();
    format!("{{{}}}", items.join(", "))
}

/// `str(int(max(strides)))`: Python's `int()` truncates toward zero.
pub fn stride_repr(strides: &[f32]) -> String {
    let max = strides.iter().copied().fold(0f32, f32::max);
    format!("{}", max.trunc() as i64)
}

/// Python's `repr(str)`: single quotes unless the text holds a single quote
/// and no double quote; backslash, the quote, `\t \n \r` escaped; other
/// non-printable characters as `\xhh`, `\uhhhh` or `\Uhhhhhhhh`. Python's
/// printability is Unicode-category based; unassigned code points (which it
/// also escapes) are written as they are here.
pub fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => {
                let v = c as u32;
                if v < 0x100 {
                    out.push_str(&format!("\\x{v:02x}"));
                } else if v < 0x10000 {
                    out.push_str(&format!("\\u{v:04x}"));
                } else {
                    out.push_str(&format!("\\U{v:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `str.isprintable` for one character: false for categories Cc, Cf, Co, Zl,
/// Zp and Zs other than the ASCII space.
fn py_printable(c: char) -> bool {
    let v = c as u32;
    if c == ' ' {
        return true;
    }
    if c.is_control() {
        return false;
    }
    let non_printable: &[(u32, u32)] = &[
        // Zs
        (0x00A0, 0x00A0),
        (0x1680, 0x1680),
        (0x2000, 0x200A),
        (0x202F, 0x202F),
        (0x205F, 0x205F),
        (0x3000, 0x3000),
        // Zl, Zp
        (0x2028, 0x2029),
        // Cf
        (0x00AD, 0x00AD),
        (0x0600, 0x0605),
        (0x061C, 0x061C),
        (0x06DD, 0x06DD),
        (0x070F, 0x070F),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFB),
        (0x110BD, 0x110BD),
        (0x1D173, 0x1D17A),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
        // Co
        (0xE000, 0xF8FF),
        (0xF0000, 0x10FFFF),
    ];
    !non_printable.iter().any(|&(lo, hi)| (lo..=hi).contains(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::detect::parse_names;

    #[test]
    fn reprs_match_python() {
        // expected values printed by CPython 3.11
        assert_eq!(py_str_repr("person"), "'person'");
        assert_eq!(py_str_repr("it's"), "\"it's\"");
        assert_eq!(py_str_repr("a'b\"c"), "'a\\'b\"c'");
        assert_eq!(py_str_repr("back\\slash\ttab"), "'back\\\\slash\\ttab'");
        assert_eq!(py_str_repr("café\u{a0}x\u{7f}"), "'café\\xa0x\\x7f'");
        assert_eq!(py_str_repr("zw\u{200b}"), "'zw\\u200b'");
        let names: Vec<String> = ["ambulance", "bus"].map(String::from).to_vec();
        assert_eq!(names_repr(&names), "{0: 'ambulance', 1: 'bus'}");
        assert_eq!(names_repr(&[]), "{}");
        assert_eq!(stride_repr(&[8.0, 16.0, 32.0]), "32");
    }

    #[test]
    fn our_own_reader_reads_it_back() {
        let names: Vec<String> = ["it's", "say \"hi\"", "plain"].map(String::from).to_vec();
        assert_eq!(parse_names(&names_repr(&names)).unwrap(), names);
    }
}
