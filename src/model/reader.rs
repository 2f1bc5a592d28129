//! Random access to a model file's parameters, one at a time, as dense f32 (GGUF Q/K rows un-permuted): what a
//! conversion (`qtune export MODEL`) reads, so converting a model never holds more than one f32 tensor of it.
use super::load::{from_gguf_layout, gguf_open, read_header, weight_files, ModelHeader};
use super::params::ParamId;
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct ModelReader {
    pub header: ModelHeader,
    source: Inner,
}

enum Inner {
    /// The weight files, mapped, and which one holds each tensor name.
    Hf {
        maps: Vec<(PathBuf, memmap2::Mmap)>,
        file_of: HashMap<String, usize>,
    },
    Gguf {
        path: PathBuf,
        ct: gguf_file::Content,
        reader: RefCell<std::io::BufReader<std::fs::File>>,
    },
}

impl ModelReader {
    /// Opens an HF directory or a GGUF file and checks that every parameter of its config is there.
    pub fn open(path: &Path) -> Result<Self> {
        let (header, source) = if path.is_dir() {
            let mut maps = Vec::new();
            let mut file_of = HashMap::new();
            for f in weight_files(path)? {
                let file = std::fs::File::open(&f).map_err(|e| Error::file(&f, format!("cannot open: {e}")))?;
                // SAFETY: a read-only mapping of a model file qtune never writes while reading it.
                let map =
                    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(&f, format!("cannot map: {e}")))?;
                let st = safetensors::SafeTensors::deserialize(&map)
                    .map_err(|e| Error::file(&f, format!("not a valid safetensors file: {e}")))?;
                for name in st.names() {
                    file_of.insert(name.to_string(), maps.len());
                }
                maps.push((f, map));
            }
            (read_header(path)?, Inner::Hf { maps, file_of })
        } else {
            let (ct, reader, header) = gguf_open(path)?;
            (header, Inner::Gguf { path: path.to_path_buf(), ct, reader: RefCell::new(reader) })
        };
        let r = ModelReader { header, source };
        for id in ParamId::all(&r.header.cfg) {
            let present = match &r.source {
                Inner::Hf { file_of, .. } => file_of.contains_key(&id.hf_name()),
                Inner::Gguf { ct, .. } => ct.tensor_infos.contains_key(&id.gguf_name()),
            };
            if !present {
                return Err(Error::file(path, format!("missing tensor `{}`", id.hf_name())));
            }
        }
        Ok(r)
    }

    /// Parameter `id` as dense f32, checked against the config's shape.
    pub fn tensor(&self, id: ParamId) -> Result<Tensor> {
        let cfg = &self.header.cfg;
        let t = match &self.source {
            Inner::Hf { maps, file_of } => {
                let name = id.hf_name();
                let (f, map) = &maps[file_of[&name]];
                let st = safetensors::SafeTensors::deserialize(map)
                    .map_err(|e| Error::file(f, format!("not a valid safetensors file: {e}")))?;
                let view = st.tensor(&name).map_err(|e| Error::file(f, format!("tensor `{name}`: {e}")))?;
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    other => return Err(Error::file(f, format!("tensor `{name}` has unsupported dtype {other:?}"))),
                };
                Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|e| Error::file(f, format!("tensor `{name}`: {e}")))?
            }
            Inner::Gguf { path, ct, reader } => {
                let name = id.gguf_name();
                let q = ct
                    .tensor(&mut *reader.borrow_mut(), &name, &Device::Cpu)
                    .and_then(|q| q.dequantize(&Device::Cpu))
                    .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
                if q.dims() != id.shape(cfg).as_slice() {
                    return Err(Error::file(path, format!("tensor `{name}` has shape {:?}", q.dims())));
                }
                from_gguf_layout(cfg, id, q)?
            }
        };
        if t.dims() != id.shape(cfg).as_slice() {
            return Err(Error::Shape(format!(
                "tensor `{}` has shape {:?}, the config implies {:?}",
                id.hf_name(),
                t.dims(),
                id.shape(cfg)
            )));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    //! The reader gives exactly what the whole-model loader gives, for an HF directory.
    use super::*;
    use crate::model::load::load_model;

    #[test]
    fn reads_each_tensor_as_the_loader_does() {
        let dir = Path::new("tests/fixtures/tiny_qwen2");
        let whole = load_model(dir).unwrap().params;
        let r = ModelReader::open(dir).unwrap();
        for id in ParamId::all(&whole.cfg) {
            let d = (r.tensor(id).unwrap() - whole.get(id)).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{id:?}");
        }
    }
}
