# Models: the builtin embedlens-mini is built offline from packaged weights; every
# model's vocabulary (input embeddings + token strings) is exported once.


rule build_mini:
    input:
        **mini_weights(),
    output:
        directory("resources/models/embedlens-mini"),
    params:
        wheels="resources/wheels",
        version=CFG["embedlens_mini"]["version"],
        adapter=f"--adapter {Path(mini_weights()['adapter']).parent}" if "adapter" in mini_weights() else "",
    log:
        "logs/build_mini/embedlens-mini.log",
    conda:
        "../envs/models.yaml"
    shell:
        "embedlens build-mini --out {output} --wheels {params.wheels} --version {params.version} "
        "--projector {input.projector} {params.adapter} > {log} 2>&1"


# Only with embedlens_mini.retrain: true (the default uses the committed weights).
rule train_projector:
    output:
        "resources/projector/embedlens-mini.safetensors",
    params:
        wheels="resources/wheels",
        steps=CFG["embedlens_mini"]["steps"],
        seed=CFG["embedlens_mini"]["seed"],
        batch_size=CFG["embedlens_mini"]["batch_size"],
    log:
        "logs/train_projector/embedlens-mini.log",
    conda:
        "../envs/models.yaml"
    shell:
        "embedlens train-projector --wheels {params.wheels} --steps {params.steps} "
        "--seed {params.seed} --batch-size {params.batch_size} --out {output} > {log} 2>&1"


# Only with embedlens_mini.retrain: true and version: 2. Fetches the object images (the one
# rule that does: a normal run never fetches training data) into resources/mini-data/.
rule train_mini_v2:
    output:
        projector="resources/mini-v2/projector.safetensors",
        adapter="resources/mini-v2/adapter/adapter_model.safetensors",
    params:
        wheels="resources/wheels",
        data="resources/mini-data",
        seed=CFG["embedlens_mini"]["seed"],
        v2=CFG["embedlens_mini"]["v2"],
    log:
        "logs/train_mini_v2/embedlens-mini.log",
    conda:
        "../envs/models.yaml"
    shell:
        "embedlens train-mini-v2 --wheels {params.wheels} --data {params.data} --out resources/mini-v2 "
        "--seed {params.seed} --stage1-steps {params.v2[stage1_steps]} --stage2-steps {params.v2[stage2_steps]} "
        "--batch-size {params.v2[batch_size]} --n-scenes {params.v2[n_scenes]} > {log} 2>&1"


rule export_vocab:
    input:
        model_input,
    output:
        directory("results/hidden/{model}/vocab.zarr"),
    params:
        model_dir=lambda wc: model_dir(wc.model),
        trust=lambda wc: "--trust-remote-code" if MODELS[wc.model]["trust_remote_code"] else "",
    log:
        "logs/export_vocab/{model}.log",
    conda:
        "../envs/extract.yaml"
    shell:
        "embedlens export-vocab --model-dir {params.model_dir:q} --model-name {wildcards.model} "
        "{params.trust} --out {output} > {log} 2>&1"
