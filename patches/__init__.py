"""One small declarative file per model family. Installed as `moe_patch.patches`.

Each file may define:
  MODEL_TYPES  model_type strings the family covers (documentation and `moe-patch report`)
  RMSNORM      {norm class name: "scale" | "scale_cast" | "offset"}  -- still proven numerically before use
  ROUTER       {router class name: spec dict}           -- see moe_patch/ops/router.py; also proven
  EXPERTS      {experts class name: flags dict}         -- only for classes without v5's decorator flags
  SKIP         {class name: reason}                     -- known not to be replaceable, and why
  MAMBA        {Mamba2 mixer class name: name of the module-level chunk-scan function it calls}
                                                        -- routed to mamba-ssm's Triton SSD kernel; proven
  MLA          {MLA attention class name: what is fused}  -- q / k / v assembly (RoPE, cats) in compiled
                                                        kernels (moe_patch/ops/mla.py); proven
  MLP          {gated MLP class name: "silu"}            -- down(silu(gate(x)) * up(x)) with the product fused
                                                        (moe_patch/ops/mlp.py); proven
  GATED_RMSNORM {gated norm class name: {"norm_before_gate": bool}}
                                                        -- on mamba-ssm's Triton gated RMSNorm (kind rmsnorm);
                                                           the semantics declared here are proven, not assumed
Experts decorated with `@use_experts_implementation` and attention modules that dispatch through
`ALL_ATTENTION_FUNCTIONS` need no entry: they are found structurally.
"""
