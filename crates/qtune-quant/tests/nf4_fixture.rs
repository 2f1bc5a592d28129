//! NF4 against bitsandbytes itself: `tests/fixtures/nf4_bnb.safetensors` was written by bitsandbytes 0.50.2 on
//! CPU (`scripts/make_nf4_fixture.py`). Codes, block constants and dequantized values must agree bit for bit.
//! A missing fixture is a failure, not a skip.

use qtune_quant::nf4::{dynamic_map, Nf4Scales, Nf4Tensor, NF4_BLOCK, NF4_LEVELS};
use qtune_quant::QuantWeight;
use safetensors::SafeTensors;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nf4_bnb.safetensors");

fn load() -> Vec<u8> {
    std::fs::read(FIXTURE).unwrap_or_else(|e| panic!("{FIXTURE}: {e} (regenerate with scripts/make_nf4_fixture.py)"))
}

fn bytes<'a>(st: &'a SafeTensors, name: &str) -> &'a [u8] {
    st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e}")).data()
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    bytes(st, name).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Bitwise equality of float arrays, reporting the first difference.
fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        let (g, w) = (got[i], want[i]);
        panic!("{what}: element {i} is {g} ({:#x}), bitsandbytes has {w} ({:#x})", g.to_bits(), w.to_bits());
    }
}

fn assert_codes_eq(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let diff = got.iter().zip(want).filter(|(a, b)| a != b).count();
    assert_eq!(diff, 0, "{what}: {diff} of {} bytes differ", got.len());
}

#[test]
fn tables_match_bitsandbytes() {
    let data = load();
    let st = SafeTensors::deserialize(&data).unwrap();
    assert_bits_eq("nf4 levels", &NF4_LEVELS, &f32s(&st, "nf4_levels"));
    assert_bits_eq("dynamic map", &dynamic_map(), &f32s(&st, "dynamic_map"));
}

#[test]
fn nf4_matches_bitsandbytes_bit_for_bit() {
    let data = load();
    let st = SafeTensors::deserialize(&data).unwrap();
    for suffix in ["", "_tail"] {
        let x = f32s(&st, &format!("input{suffix}"));
        let n = x.len();

        let plain = Nf4Tensor::quantize(&x, 1, n, NF4_BLOCK, false).unwrap();
        assert_codes_eq(&format!("codes{suffix}"), plain.codes(), bytes(&st, &format!("codes{suffix}")));
        let Nf4Scales::Plain(absmax) = plain.scales() else { unreachable!() };
        assert_bits_eq(&format!("absmax{suffix}"), absmax, &f32s(&st, &format!("absmax{suffix}")));
        let mut y = vec![0.0; n];
        plain.dequantize_into(&mut y).unwrap();
        assert_bits_eq(&format!("dequant_nodq{suffix}"), &y, &f32s(&st, &format!("dequant_nodq{suffix}")));

        let dq = Nf4Tensor::quantize(&x, 1, n, NF4_BLOCK, true).unwrap();
        assert_codes_eq(&format!("codes{suffix} (double quant)"), dq.codes(), plain.codes());
        let Nf4Scales::Double(d) = dq.scales() else { unreachable!() };
        assert_bits_eq(&format!("dq_offset{suffix}"), &[d.offset], &f32s(&st, &format!("dq_offset{suffix}")));
        assert_bits_eq(&format!("dq_absmax2{suffix}"), &d.absmax2, &f32s(&st, &format!("dq_absmax2{suffix}")));
        assert_codes_eq(&format!("dq_codes{suffix}"), &d.codes, bytes(&st, &format!("dq_codes{suffix}")));
        dq.dequantize_into(&mut y).unwrap();
        assert_bits_eq(&format!("dequant{suffix}"), &y, &f32s(&st, &format!("dequant{suffix}")));

        // The same values as a 2-D weight whose rows are not whole blocks (blocks span rows, as in bitsandbytes'
        // flattening): same codes, and row-wise dequantization equals the flat one.
        let rows = if suffix.is_empty() { 1024 } else { 32 }; // 32 or 76 columns
        let cols = n / rows;
        let t2 = Nf4Tensor::quantize(&x, rows, cols, NF4_BLOCK, true).unwrap();
        assert_codes_eq("2-D codes", t2.codes(), dq.codes());
        let mut part = vec![0.0; 3 * cols];
        t2.dequantize_rows(5..8, &mut part).unwrap();
        assert_bits_eq("2-D rows 5..8", &part, &y[5 * cols..8 * cols]);
    }
}
