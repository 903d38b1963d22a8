# Models: the builtin embedlens-mini is built offline from packaged weights; every
# model's vocabulary (input embeddings + token strings) is exported once.


rule build_mini:
    input:
        projector=mini_projector(),
    output:
        directory("resources/models/embedlens-mini"),
    params:
        wheels="resources/wheels",
    log:
        "logs/build_mini/embedlens-mini.log",
    conda:
        "../envs/models.yaml"
    shell:
        "embedlens build-mini --out {output} --wheels {params.wheels} "
        "--projector {input.projector} > {log} 2>&1"


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
