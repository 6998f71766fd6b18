"""``zoompipe encoders``: the patch encoders, their licences and where their weights come from."""

from __future__ import annotations

import click


@click.command("encoders")
@click.argument("name", required=False)
@click.option("--weights", "--encoder-weights", "weights", type=click.Path(exists=True), default=None,
              help="With NAME: a weights file or folder to check instead of the Hugging Face cache / hub.")
def encoders_command(name, weights) -> None:
    """List the patch encoders: feature size, input size, licence, gating and weights' source.

    With NAME (a hub model), find its weights (--weights, else the Hugging Face cache, else the
    hub with HF_TOKEN), check their names and shapes against the architecture without loading
    them, and print the file and its SHA-256, which feature files record.
    """
    from pathlib import Path

    from zoompipe.encoders import encoder_info, list_encoders

    if name is None:
        click.echo(f"{'name':20s} {'dim':>5s} {'input':>5s} {'params':>6s}  {'gated':5s}  {'licence':34s} weights")
        for entry in list_encoders():
            info = encoder_info(entry)
            dim = str(info.feature_dim or "model")
            size = str(info.input_size or "model")
            click.echo(f"{entry:20s} {dim:>5s} {size:>5s} {info.params or '-':>6s}  {'yes' if info.gated else 'no':5s}  "
                       f"{info.licence:34s} {info.source} ({info.hub_page})")
        return
    from zoompipe.encoders import check_weights

    path, identity = check_weights(name, Path(weights) if weights else None)
    click.echo(f"{name}: {path}\n  fits the architecture; {identity}")
