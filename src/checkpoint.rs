//! Training-state files: named raw tensors (u8, u32, f32) and JSON metadata in one safetensors file, written
//! atomically (temporary file, fsync, rename) with a CRC32 of every tensor's bytes that is verified on load. A method
//! saves its state in its own training format — quantized codes, scales, outliers, optimizer states — so a run can
//! be inspected or continued exactly.
use crate::{Error, Result};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Bumped whenever the layout of a method's state changes.
pub const FORMAT_VERSION: u64 = 1;

#[derive(Default)]
pub struct StateWriter {
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    meta: serde_json::Map<String, serde_json::Value>,
    /// A writer made by [`StateWriter::hashing`]: the running hash; tensors are hashed as they arrive, not kept.
    hash: Option<u64>,
}

/// FNV-1a over 8-byte words (then the remaining bytes), continuing from `h`.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(0x100_0000_01b3);
    }
    for &b in words.remainder() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

struct Raw<'a>(&'a (Dtype, Vec<usize>, Vec<u8>));

impl safetensors::View for Raw<'_> {
    fn dtype(&self) -> Dtype {
        self.0 .0
    }
    fn shape(&self) -> &[usize] {
        &self.0 .1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.0 .2)
    }
    fn data_len(&self) -> usize {
        self.0 .2.len()
    }
}

fn crc(tensors: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (name, (_, shape, data)) in tensors {
        h.update(name.as_bytes());
        shape.iter().for_each(|d| h.update(&(*d as u64).to_le_bytes()));
        h.update(data);
    }
    h.finalize()
}

impl StateWriter {
    pub fn new(method: &str) -> Self {
        let mut w = StateWriter::default();
        w.meta("method", method);
        w.meta("format_version", FORMAT_VERSION);
        w
    }
    /// A writer that keeps nothing: [`StateWriter::digest`] hashes every tensor's name, shape and bytes in the order
    /// they were given (a method saves in a fixed order), so a whole state is hashed with one tensor's memory.
    pub fn hashing(method: &str) -> Self {
        StateWriter { hash: Some(0xcbf2_9ce4_8422_2325), ..StateWriter::new(method) }
    }

    fn insert(&mut self, name: &str, t: (Dtype, Vec<usize>, Vec<u8>)) {
        match &mut self.hash {
            Some(h) => {
                *h = fnv(*h, name.as_bytes());
                t.1.iter().for_each(|d| *h = fnv(*h, &(*d as u64).to_le_bytes()));
                *h = fnv(*h, &t.2);
            }
            None => {
                self.tensors.insert(name.into(), t);
            }
        }
    }

    pub fn meta(&mut self, key: &str, v: impl serde::Serialize) {
        self.meta.insert(key.into(), serde_json::to_value(v).expect("serializable metadata"));
    }
    pub fn u8(&mut self, name: &str, v: &[u8]) {
        self.insert(name, (Dtype::U8, vec![v.len()], v.to_vec()));
    }
    pub fn u32(&mut self, name: &str, v: &[u32]) {
        self.insert(name, (Dtype::U32, vec![v.len()], v.iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    pub fn f32(&mut self, name: &str, v: &[f32]) {
        self.insert(name, (Dtype::F32, vec![v.len()], v.iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    pub fn tensor(&mut self, name: &str, t: &candle_core::Tensor) -> Result<()> {
        if let Some(bad) =
            t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?.iter().find(|x| !x.is_finite())
        {
            return Err(Error::Numerical(format!("state tensor `{name}` holds {bad}; refusing to save it")));
        }
        self.f32(name, &t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?);
        Ok(())
    }

    /// Every parameter of a store, by its HF name.
    pub fn params(&mut self, p: &crate::model::ParamStore) -> Result<()> {
        for id in p.ids() {
            self.tensor(&id.hf_name(), p.get(id))?;
        }
        Ok(())
    }

    /// A 64-bit hash (FNV-1a over 8-byte words) of every tensor's name, shape and bytes: equal states, equal hashes.
    /// A [`StateWriter::hashing`] writer's covers the tensors in the order given; another's, in name order.
    pub fn digest(&self) -> u64 {
        if let Some(h) = self.hash {
            return h;
        }
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for (name, (_, shape, data)) in &self.tensors {
            h = fnv(h, name.as_bytes());
            shape.iter().for_each(|d| h = fnv(h, &(*d as u64).to_le_bytes()));
            h = fnv(h, data);
        }
        h
    }

    /// Writes the file atomically; the CRC of all tensors goes into the metadata.
    pub fn write(mut self, path: &Path) -> Result<()> {
        if self.hash.is_some() {
            return Err(Error::file(path, "a hashing state writer keeps no tensors to write"));
        }
        let c = crc(&self.tensors);
        self.meta("crc32", c);
        let meta = HashMap::from([("qtune".to_string(), serde_json::Value::Object(self.meta).to_string())]);
        let views: Vec<(&String, Raw)> = self.tensors.iter().map(|(k, v)| (k, Raw(v))).collect();
        let bytes = safetensors::tensor::serialize(views, Some(meta))
            .map_err(|e| Error::file(path, format!("cannot serialize: {e}")))?;
        crate::io::write_bytes_atomic(path, &bytes)
    }
}

/// A state file, validated: safetensors structure, metadata, and the CRC of its tensors.
pub struct StateReader {
    path: PathBuf,
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    meta: serde_json::Value,
}

impl StateReader {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::file(path, format!("not a valid state file: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::file(path, format!("not a valid state file: {e}")))?;
        let meta: serde_json::Value = md
            .metadata()
            .as_ref()
            .and_then(|m| m.get("qtune"))
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| Error::file(path, "not a qtune state file (no metadata)"))?;
        if meta["format_version"].as_u64() != Some(FORMAT_VERSION) {
            return Err(Error::file(
                path,
                format!("state format version {} is not {FORMAT_VERSION}", meta["format_version"]),
            ));
        }
        let tensors: BTreeMap<_, _> =
            st.tensors().into_iter().map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
        if meta["crc32"].as_u64() != Some(crc(&tensors) as u64) {
            return Err(Error::file(path, "checksum mismatch: the state file is corrupt"));
        }
        Ok(StateReader { path: path.to_path_buf(), tensors, meta })
    }

    pub fn meta(&self) -> &serde_json::Value {
        &self.meta
    }

    fn raw(&self, name: &str, dtype: Dtype) -> Result<&[u8]> {
        match self.tensors.get(name) {
            Some((d, _, data)) if *d == dtype => Ok(data),
            Some((d, _, _)) => Err(Error::file(&self.path, format!("`{name}` is {d:?}, expected {dtype:?}"))),
            None => Err(Error::file(&self.path, format!("missing `{name}`"))),
        }
    }
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    /// Reads back a parameter store's tensors written by [`StateWriter::params`], checking every shape.
    pub fn params(&self, into: &mut crate::model::ParamStore) -> Result<()> {
        for id in into.ids() {
            let shape = id.shape(&into.cfg);
            let v = self.f32_len(&id.hf_name(), shape.iter().product())?;
            let dev = into.device().clone();
            into.set(id, candle_core::Tensor::from_vec(v, shape, &dev)?);
        }
        Ok(())
    }
    pub fn u8(&self, name: &str) -> Result<Vec<u8>> {
        Ok(self.raw(name, Dtype::U8)?.to_vec())
    }
    pub fn u32(&self, name: &str) -> Result<Vec<u32>> {
        Ok(self
            .raw(name, Dtype::U32)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self
            .raw(name, Dtype::F32)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
    /// An f32 vector of exactly `len` elements.
    pub fn f32_len(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let v = self.f32(name)?;
        if v.len() != len {
            return Err(Error::file(&self.path, format!("`{name}` has {} elements, expected {len}", v.len())));
        }
        Ok(v)
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.safetensors");
        let mut w = StateWriter::new("qft");
        w.u8("a.codes", &[1, 2, 255]);
        w.u32("a.idx", &[7, 1 << 31]);
        w.f32("a.scales", &[0.5, -1.25]);
        w.meta("step", 12);
        w.write(&p).unwrap();
        let r = StateReader::open(&p).unwrap();
        assert_eq!(r.u8("a.codes").unwrap(), vec![1, 2, 255]);
        assert_eq!(r.u32("a.idx").unwrap(), vec![7, 1 << 31]);
        assert_eq!(r.f32("a.scales").unwrap(), vec![0.5, -1.25]);
        assert_eq!(r.meta()["step"], 12);
        assert!(r.f32("a.codes").is_err());
        // Flip one byte of tensor data: the checksum catches it.
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        let e = StateReader::open(&p).err().unwrap().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        std::fs::write(&p, &bytes[..n / 2]).unwrap();
        assert!(StateReader::open(&p).is_err());
    }
}
