#Requires -Version 5.1
<#
.SYNOPSIS
    Creates a Hyper-V VM that boots the hvnet appliance from its VHDX.

.DESCRIPTION
    Makes a Generation 1 (BIOS) or Generation 2 (UEFI) VM around the disk that
    scripts/image builds (target/images/hvnet.vhdx; the same disk boots both ways), with:

      - NicCount synthetic network adapters named nic0, nic1, ... on one virtual switch;
      - static memory (the appliance has no balloon driver) and ProcessorCount vCPUs;
      - Secure Boot off on Generation 2 (the image's GRUB is not signed, so Secure Boot
        would refuse it) and the disk as first boot device;
      - COM1 connected to the named pipe \\.\pipe\<Name>-com1, where the appliance's log
        appears (115200 8N1, plain text; the pipe exists while the VM runs);
      - the integration services heartbeat, shutdown, time synchronization and
        Key-Value Pair Exchange (KVP: it is how Hyper-V learns the adapters' addresses)
        enabled; automatic checkpoints off where Hyper-V has them.

    The disk file is attached as it is, not copied: give every VM its own copy. Hyper-V
    refuses disk files that carry the NTFS sparse attribute (which copies from Linux or
    WSL can have); the script clears it, with fsutil. -WhatIf shows what would be done.

.PARAMETER Name
    Name of the new VM; also names the COM1 pipe. Letters, digits, '.', '_', '-'.

.PARAMETER Vhdx
    Path of the appliance disk (hvnet.vhdx from scripts/image). Generation 1 also takes
    a .vhd.

.PARAMETER Generation
    1 (BIOS, like Azure Gen1) or 2 (UEFI, like Azure Gen2). Default 2. Only Generation 2
    VMs take network adapters added or removed while running.

.PARAMETER SwitchName
    Existing virtual switch for every adapter (Get-VMSwitch lists them; 'Default Switch'
    gives NAT and DHCP on a Windows client).

.PARAMETER MemoryMB
    Startup memory in MB, static. Default 512.

.PARAMETER ProcessorCount
    Virtual processors. Default 2.

.PARAMETER NicCount
    Network adapters to create, 1 to 8 (Hyper-V's limit for synthetic adapters). Default 2.

.PARAMETER Start
    Start the VM once it is configured.

.EXAMPLE
    .\New-HvnetVM.ps1 -Name hvnet1 -Vhdx D:\VMs\hvnet1.vhdx -SwitchName 'Default Switch' -Start

    Generation 2 VM with two adapters, started; its log is on \\.\pipe\hvnet1-com1.

.EXAMPLE
    .\New-HvnetVM.ps1 -Name hvnet-bios -Vhdx D:\VMs\bios.vhdx -Generation 1 -SwitchName LAN -NicCount 4 -WhatIf

    Shows what would be created, creates nothing.

.OUTPUTS
    Microsoft.HyperV.PowerShell.VirtualMachine, the new VM.

.NOTES
    Needs the Hyper-V PowerShell module and Hyper-V administrator rights (an elevated
    session, or membership in 'Hyper-V Administrators').
#>
[CmdletBinding(SupportsShouldProcess)]
param(
    [Parameter(Mandatory)]
    [ValidateLength(1, 100)]
    [ValidatePattern('^[A-Za-z0-9][A-Za-z0-9._-]*$')]
    [string] $Name,

    [Parameter(Mandatory)]
    [ValidateScript({
            if (-not (Test-Path -LiteralPath $_ -PathType Leaf)) { throw "disk file not found: $_" }
            if ([IO.Path]::GetExtension($_) -notin '.vhdx', '.vhd') { throw "not a .vhdx or .vhd file: $_" }
            $true
        })]
    [string] $Vhdx,

    [ValidateSet(1, 2)]
    [int] $Generation = 2,

    [Parameter(Mandatory)]
    [ValidateNotNullOrEmpty()]
    [string] $SwitchName,

    [ValidateRange(64, 1048576)]
    [int] $MemoryMB = 512,

    [ValidateRange(1, 240)]
    [int] $ProcessorCount = 2,

    [ValidateRange(1, 8)]
    [int] $NicCount = 2,

    [switch] $Start
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

if (-not (Get-Command -Name 'New-VM' -ErrorAction SilentlyContinue)) {
    throw ('The Hyper-V PowerShell module is not available. Enable Hyper-V with its management tools ' +
        '(Windows client: Enable-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V-All; ' +
        'Windows Server: Install-WindowsFeature Hyper-V -IncludeManagementTools) and run this elevated.')
}

$diskPath = (Resolve-Path -LiteralPath $Vhdx).ProviderPath
if ($Generation -eq 2 -and [IO.Path]::GetExtension($diskPath) -eq '.vhd') {
    throw 'Generation 2 VMs boot from a .vhdx disk: use hvnet.vhdx from scripts/image (or -Generation 1).'
}
if (Get-VM -Name $Name -ErrorAction SilentlyContinue) {
    throw "A VM named '$Name' already exists (remove it with Remove-VM, or choose another -Name)."
}
if (-not (Get-VMSwitch -Name $SwitchName -ErrorAction SilentlyContinue)) {
    throw "There is no virtual switch named '$SwitchName'; Get-VMSwitch lists them."
}
$users = @(Get-VM | Get-VMHardDiskDrive | Where-Object { $_.Path -eq $diskPath })
if ($users.Count -gt 0) {
    throw "$diskPath is already attached to VM '$($users[0].VMName)'; give each VM its own copy of the disk."
}

# Hyper-V will not open a disk file marked sparse ("must not be sparse").
$attributes = (Get-Item -LiteralPath $diskPath).Attributes
if ($attributes -band [IO.FileAttributes]::SparseFile) {
    if ($PSCmdlet.ShouldProcess($diskPath, 'Clear the NTFS sparse attribute (Hyper-V refuses sparse disk files)')) {
        & fsutil.exe sparse setflag $diskPath 0 | Out-Null
        if ($LASTEXITCODE -ne 0) {
            throw "fsutil could not clear the sparse attribute of $diskPath (exit $LASTEXITCODE)."
        }
    }
}

$pipe = "\\.\pipe\$Name-com1"
$memoryBytes = [int64]$MemoryMB * 1MB
$what = "Generation $Generation VM: $MemoryMB MB, $ProcessorCount vCPUs, $NicCount adapters on '$SwitchName', " +
    "disk $diskPath, COM1 on $pipe"
if (-not $PSCmdlet.ShouldProcess($Name, "Create $what")) {
    return
}

$vm = $null
try {
    $vm = New-VM -Name $Name -Generation $Generation -MemoryStartupBytes $memoryBytes -VHDPath $diskPath `
        -SwitchName $SwitchName -Confirm:$false
    Set-VMProcessor -VM $vm -Count $ProcessorCount -Confirm:$false
    Set-VMMemory -VM $vm -DynamicMemoryEnabled $false -StartupBytes $memoryBytes -Confirm:$false

    # New-VM made one adapter on the switch: it becomes nic0, the others join it.
    Get-VMNetworkAdapter -VM $vm | Rename-VMNetworkAdapter -NewName 'nic0' -Confirm:$false
    for ($i = 1; $i -lt $NicCount; $i++) {
        Add-VMNetworkAdapter -VM $vm -Name "nic$i" -SwitchName $SwitchName -Confirm:$false
    }

    if ($Generation -eq 2) {
        $bootDisk = Get-VMHardDiskDrive -VM $vm | Select-Object -First 1
        Set-VMFirmware -VM $vm -EnableSecureBoot Off -FirstBootDevice $bootDisk -Confirm:$false
    }

    Set-VMComPort -VM $vm -Number 1 -Path $pipe -Confirm:$false

    foreach ($service in 'Heartbeat', 'Shutdown', 'Time Synchronization', 'Key-Value Pair Exchange') {
        Enable-VMIntegrationService -VM $vm -Name $service -Confirm:$false
    }
    # Checkpoints of a running appliance are of no use, and automatic ones pile up.
    if ((Get-Command -Name 'Set-VM').Parameters.ContainsKey('AutomaticCheckpointsEnabled')) {
        Set-VM -VM $vm -AutomaticCheckpointsEnabled $false -Confirm:$false
    }
}
catch {
    if ($null -ne $vm) {
        Write-Warning "Configuring '$Name' failed; removing the half-made VM (the disk file stays)."
        Remove-VM -VM $vm -Force -Confirm:$false -ErrorAction Continue
    }
    throw
}

if ($Start) {
    Start-VM -VM $vm -Confirm:$false
}

Write-Host "Created '$Name' (Generation $Generation, $NicCount adapters on '$SwitchName')."
Write-Host "Serial log: connect to $pipe while the VM runs (see README.md: PuTTY, or the PowerShell reader)."
Write-Host "Hot-plug: .\Add-HvnetNic.ps1 -VMName $Name -SwitchName '$SwitchName' / .\Remove-HvnetNic.ps1 -VMName $Name -Name nicN"
Get-VM -Name $Name
