//! The CPU's vector and matrix features, detected at run time: the same binary runs on AVX2-only machines and on
//! AVX-512 / VNNI / AMX ones, and reports say which kernels a measurement ran on.
use std::fmt;

/// What this CPU offers the kernels (x86_64; all false elsewhere).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    pub avx2_fma: bool,
    pub avx512f: bool,
    /// AVX512-VNNI (`vpdpbusd` on 512-bit registers).
    pub avx512_vnni: bool,
    /// AVX-VNNI (the same instruction on 256-bit registers, VEX-encoded).
    pub avx_vnni: bool,
    /// AMX tiles with INT8 and BF16 multiplies (CPUID; the OS must still grant the tile state per process).
    pub amx_int8: bool,
    pub amx_bf16: bool,
}

impl CpuFeatures {
    /// The features of the CPU this process runs on.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // AMX has no stable `is_x86_feature_detected!` name yet: CPUID leaf 7, sub-leaf 0, EDX bits 22 (BF16),
            // 24 (TILE), 25 (INT8).
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            let tile = edx & (1 << 24) != 0;
            CpuFeatures {
                avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                avx512f: is_x86_feature_detected!("avx512f"),
                avx512_vnni: is_x86_feature_detected!("avx512vnni"),
                avx_vnni: is_x86_feature_detected!("avxvnni"),
                amx_int8: tile && edx & (1 << 25) != 0,
                amx_bf16: tile && edx & (1 << 22) != 0,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures::default()
        }
    }
}

/// "avx2+fma avx512f avx512-vnni" (the features present, or "no vector extensions").
impl fmt::Display for CpuFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (self.avx2_fma, "avx2+fma"),
            (self.avx512f, "avx512f"),
            (self.avx512_vnni, "avx512-vnni"),
            (self.avx_vnni, "avx-vnni"),
            (self.amx_int8, "amx-int8"),
            (self.amx_bf16, "amx-bf16"),
        ];
        let on: Vec<&str> = names.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect();
        f.write_str(if on.is_empty() { "no vector extensions" } else { "" })?;
        f.write_str(&on.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Detection agrees with std's own detection where std has one, and the report names exactly what is present.
    #[test]
    fn detection_matches_std_and_the_report_names_it() {
        let f = CpuFeatures::detect();
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(f.avx512f, is_x86_feature_detected!("avx512f"));
            assert_eq!(f.avx2_fma, is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
        }
        let text = f.to_string();
        assert_eq!(text.contains("avx512f"), f.avx512f, "{text}");
        let none = CpuFeatures::default().to_string();
        assert_eq!(none, "no vector extensions");
        let some = CpuFeatures { avx2_fma: true, amx_int8: true, ..Default::default() }.to_string();
        assert_eq!(some, "avx2+fma amx-int8");
    }
}
